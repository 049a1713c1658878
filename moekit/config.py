"""Configuration of an MoE layer: one frozen, keyword-only dataclass that validates itself.

Every field a user can get wrong is checked in `__post_init__`, and the error names the field, the
value and what is allowed. Runtime things (device, dtype, process group) are never config fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from moekit.traits import ACTIVATIONS, GATED_ACTIVATIONS, ROUTER_NAMES, ROUTER_TRAITS


def check(condition: bool, field_name: str, value: Any, allowed: str) -> None:
    """Raise a ValueError naming the field, its bad value and what is allowed."""
    if not condition:
        raise ValueError(f"{field_name}={value!r} is invalid: {allowed}")


def check_choice(value: Any, field_name: str, choices: tuple) -> None:
    check(isinstance(value, str) and value in choices, field_name, value,
          f"must be one of {', '.join(map(repr, choices))}")


def is_int(value: Any) -> bool:
    """An integer and not a bool (True is an int to Python, never a count to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(obj: Any, name: str, *, minimum: int, optional: bool = False, prefix: str = "") -> None:
    """Field `name` of `obj` is an integer >= minimum (or None when optional)."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    check(is_int(value) and value >= minimum, prefix + name, value,
          f"must be an integer >= {minimum}" + (" or None" if optional else ""))


def check_real(obj: Any, name: str, *, positive: bool = False, optional: bool = False, prefix: str = "",
               allowed: str | None = None) -> None:
    """Field `name` of `obj` is a finite real number, > 0 when `positive`, else >= 0 (or None)."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    check(ok, prefix + name, value, allowed or (f"must be a finite number {'> 0' if positive else '>= 0'}"
                                                + (" or None" if optional else "")))


def check_bools(obj: Any, names: tuple[str, ...], prefix: str = "") -> None:
    """Each field is True or False (a string such as "no" would read as True)."""
    for name in names:
        value = getattr(obj, name)
        check(isinstance(value, bool), prefix + name, value, "must be true or false")


def _routers(trait: str) -> str:
    """The routers that have a (truthy) trait, for error messages."""
    return ", ".join(repr(n) for n, t in ROUTER_TRAITS.items() if getattr(t, trait))


class JsonConfig:
    """JSON round trip shared by the config dataclasses: to_dict / from_dict / save / load."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def check_fields(cls, data: Any) -> None:
        """Raise a ValueError unless `data` is a dict of this config's field names."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object of {cls.__name__} fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        cls.check_fields(data)
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Any:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of {cls.__name__} fields")
        return cls.from_dict(data)


@dataclass(frozen=True, kw_only=True)
class MoEConfig(JsonConfig):
    """Everything that defines an MoE feed-forward layer.

    Routing:
        router: which router picks experts ("topk" covers Switch, Mixtral, DBRX, Qwen-MoE, OLMoE,
            DeepSeek-V2/V3 by configuration).
        top_k: experts per token (for expert choice: the average, which sets each expert's capacity).
        score_func: "softmax" or "sigmoid" scores over experts.
        softmax_after_topk: softmax over only the selected logits (Mixtral's formulation; equal to
            softmax-then-renormalise).
        normalize_topk: renormalise the selected weights to sum to 1.
        routed_scaling_factor: multiplies the combine weights (DeepSeek-V2/V3).
        router_bias: a learned bias in the router's linear layer.
        noisy_gating: Shazeer et al. 2017 learned noise, softplus(x W_noise) * N(0, 1), training only.
        jitter_eps: Switch multiplicative jitter on the router input, U(1-eps, 1+eps), training only.
        num_groups / topk_groups / group_score: group-limited routing (DeepSeek-V2 device-limited,
            DeepSeek-V3 node-limited): experts in `num_groups` groups, each token keeps the best
            `topk_groups` groups (scored by their max or their top-2 sum) and picks its top-k there.
        expert_bias: aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores
            for selection only; `bias_update_rate` is the step of its sign update.
        hash_vocab_size / hash_table: the token-id -> expert table of hash routing.
        sinkhorn_iters: iterations of the balanced-assignment (Sinkhorn) router.
        soft_slots: slots per expert of Soft MoE.
        sparsemixer_eps: relative logit distance (x2) within which PhiMoE's sparsemixer router
            keeps experts in each slot's softmax (transformers' router_jitter_noise).
    Capacity:
        capacity_factor: None for dropless; otherwise each expert keeps at most
            ceil(capacity_factor * T * top_k / E) slots.
        drop_policy: which slots are kept when an expert overflows: earliest "position", highest
            "score", or "batch_priority" (V-MoE's BPR: choice by choice, tokens ranked across the
            batch by their largest routing weight, so low-score tokens drop first).
        expert_capacity: a fixed number of slots per expert and capacity group, instead of
            capacity_factor (transformers' SwitchTransformersConfig.expert_capacity).
        capacity_group: which tokens compete for those slots: the whole "batch", or each
            "sequence" on its own (GShard groups; Switch Transformers in transformers).
    Experts:
        activation: "swiglu", "geglu", "clamped_swiglu" (gpt-oss; gated, 3 matrices) or "gelu",
            "relu", "silu" (2 matrices).
        expert_mlp_bias: biases in the expert MLPs.
        num_shared_experts / shared_d_ff / shared_expert_gate: shared experts every token passes
            through (DeepSeekMoE), optionally scaled by a sigmoid gate (Qwen2-MoE). shared_d_ff is
            the total width of the shared part (defaults to num_shared_experts * d_ff).
        dense_residual_d_ff: a dense MLP in parallel with the MoE (Snowflake Arctic).
    Losses:
        load_balance_coef, load_balance_granularity: Switch/GShard balance loss, per micro-batch,
            per sequence (DeepSeek-V3) or over the global batch.
        z_loss_coef: ST-MoE router z-loss.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    # The router names are ROUTER_TRAITS' keys (moekit/traits.py); a test keeps this Literal in step.
    router: Literal["topk", "expert_choice", "hash", "sinkhorn", "soft", "sparsemixer"] = "topk"
    # token-choice scoring
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    softmax_after_topk: bool = False
    normalize_topk: bool = True
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    noisy_gating: bool = False
    jitter_eps: float = 0.0
    # group-limited routing
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: Literal["max", "top2_sum"] = "max"
    # aux-loss-free balancing
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    # other routers
    hash_vocab_size: int | None = None
    hash_table: Literal["random", "balanced"] = "random"
    sinkhorn_iters: int = 3
    soft_slots: int = 1
    sparsemixer_eps: float = 0.01
    # capacity
    capacity_factor: float | None = None
    drop_policy: Literal["position", "score", "batch_priority"] = "position"
    expert_capacity: int | None = None
    capacity_group: Literal["batch", "sequence"] = "batch"
    # experts
    activation: Literal["swiglu", "geglu", "clamped_swiglu", "gelu", "relu", "silu"] = "swiglu"
    expert_mlp_bias: bool = False
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    dense_residual_d_ff: int | None = None
    # losses
    load_balance_coef: float = 0.01
    load_balance_granularity: Literal["micro_batch", "sequence", "global"] = "micro_batch"
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "sinkhorn_iters", "soft_slots"):
            check_int(self, name, minimum=1)
        check_int(self, "num_shared_experts", minimum=0)
        for name in ("shared_d_ff", "dense_residual_d_ff", "hash_vocab_size", "expert_capacity",
                     "num_groups", "topk_groups"):
            check_int(self, name, minimum=1, optional=True)
        check_bools(self, ("softmax_after_topk", "normalize_topk", "router_bias", "noisy_gating",
                           "expert_bias", "expert_mlp_bias", "shared_expert_gate"))
        check_choice(self.router, "router", ROUTER_NAMES)
        check_choice(self.score_func, "score_func", ("softmax", "sigmoid"))
        check_choice(self.activation, "activation", ACTIVATIONS)
        check_choice(self.drop_policy, "drop_policy", ("position", "score", "batch_priority"))
        check_choice(self.group_score, "group_score", ("max", "top2_sum"))
        check_choice(self.hash_table, "hash_table", ("random", "balanced"))
        check_choice(self.load_balance_granularity, "load_balance_granularity",
                     ("micro_batch", "sequence", "global"))
        check_choice(self.capacity_group, "capacity_group", ("batch", "sequence"))
        check(self.top_k <= self.num_experts, "top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        check_real(self, "capacity_factor", positive=True, optional=True,
                   allowed="must be a finite number > 0, or None for dropless routing")
        if self.expert_capacity is not None:
            check(self.capacity_factor is None, "capacity_factor", self.capacity_factor,
                  "set either capacity_factor or expert_capacity, not both")
        check_real(self, "routed_scaling_factor", positive=True)
        check_real(self, "jitter_eps")
        check(self.jitter_eps < 1, "jitter_eps", self.jitter_eps, "must be in [0, 1)")
        for name in ("bias_update_rate", "load_balance_coef", "z_loss_coef", "sparsemixer_eps"):
            check_real(self, name)
        if self.shared_d_ff is not None or self.shared_expert_gate:
            check(self.num_shared_experts >= 1, "num_shared_experts", self.num_shared_experts,
                  "must be >= 1 when shared_d_ff or shared_expert_gate is set")
        self._check_groups()
        self._check_router_specific()

    def _check_groups(self) -> None:
        if self.num_groups is None and self.topk_groups is None:
            return
        check(self.num_groups is not None and self.topk_groups is not None, "num_groups",
              self.num_groups, "num_groups and topk_groups must be set together")
        assert self.num_groups is not None and self.topk_groups is not None
        check(ROUTER_TRAITS[self.router].token_choice, "router", self.router,
              f"group-limited routing (num_groups) needs a token-choice router ({_routers('token_choice')})")
        check(self.num_groups >= 1 and self.num_experts % self.num_groups == 0, "num_groups",
              self.num_groups, f"must be >= 1 and divide num_experts ({self.num_experts})")
        check(1 <= self.topk_groups <= self.num_groups, "topk_groups", self.topk_groups,
              f"must be in [1, num_groups={self.num_groups}]")
        per_group = self.num_experts // self.num_groups
        check(self.topk_groups * per_group >= self.top_k, "topk_groups", self.topk_groups,
              f"the kept groups hold {self.topk_groups * per_group} experts, fewer than "
              f"top_k={self.top_k}")
        if self.group_score == "top2_sum":
            check(per_group >= 2, "group_score", self.group_score,
                  "'top2_sum' needs at least 2 experts per group")

    def _check_router_specific(self) -> None:
        traits = ROUTER_TRAITS[self.router]
        name = f"router={self.router!r}"
        if not traits.token_choice:
            for field_name in ("noisy_gating", "expert_bias", "softmax_after_topk"):
                value = getattr(self, field_name)
                check(not value, field_name, value, f"is a token-choice option ({_routers('token_choice')}), "
                      f"not supported with {name}")
        if not traits.jitter:
            check(not self.jitter_eps, "jitter_eps", self.jitter_eps,
                  f"is supported with {_routers('jitter')}, not {name}")
        check(self.score_func in traits.score_funcs, "score_func", self.score_func,
              f"{name} supports only {', '.join(map(repr, traits.score_funcs))}")
        if self.softmax_after_topk:
            check(self.score_func == "softmax", "softmax_after_topk", True, "needs score_func='softmax'")
        if self.router == "hash":
            check(self.hash_vocab_size is not None, "hash_vocab_size", None,
                  "router='hash' needs hash_vocab_size (the tokenizer's vocabulary size)")
        if traits.gate != "linear":
            check(not self.router_bias, "router_bias", self.router_bias,
                  f"{name} has no linear gate to put a bias in")
        if not traits.scales_weights:
            check(self.routed_scaling_factor == 1.0, "routed_scaling_factor", self.routed_scaling_factor,
                  f"must be 1.0 with {name} (only {_routers('scales_weights')} scale weights)")
        if traits.own_capacity:
            for field_name in ("capacity_factor", "expert_capacity"):
                check(getattr(self, field_name) is None, field_name, getattr(self, field_name),
                      f"{name} sets expert capacity itself; leave {field_name} None")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def shared_width(self) -> int:
        """Total ffn width of the shared experts (0 when there are none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_d_ff if self.shared_d_ff is not None else self.num_shared_experts * self.d_ff
