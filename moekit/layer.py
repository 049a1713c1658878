"""The MoE layer: router + dispatcher + experts, plus optional shared experts and dense residual.

    x -> router -> (capacity) -> dispatch (sort by expert) -> experts -> combine (weights) -> y
                                                           + shared experts (+ sigmoid gate)
                                                           + dense residual MLP
Auxiliary losses are returned by name; their coefficients are applied by the model.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch.capacity import apply_capacity, expert_capacity
from moekit.dispatch.sort import SortDispatcher, combine_slots
from moekit.experts.dense import DenseMLP
from moekit.experts.grouped import Experts
from moekit.inputs import bool_mask, check_float_input
from moekit.routing import ROUTERS, Router
from moekit.traits import ROUTER_TRAITS
from moekit.types import MoEOutput, RoutingDecision


# Mean rows per expert up to which an inference forward runs the experts' slot kernel; above it
# the grouped GEMM's blocking pays (benchmarks/moe_layer.py).
KERNEL_MEAN_ROWS = 4


class RoutedLayer(nn.Module):
    """What every routed layer shares (MoELayer; the mixture-of-attention of model/moa.py): a
    router, the expert loads counted for aux-loss-free balancing, and the aux losses by name."""

    def __init__(self, config: MoEConfig, router: Router | None = None) -> None:
        super().__init__()
        if config.router not in ROUTERS:
            raise ValueError(f"router={config.router!r} is not available; have {sorted(ROUTERS)}")
        self.config = config
        self.router = router if router is not None else ROUTERS[config.router](config)
        # Tokens routed to each expert since the last `update_expert_bias` (training only).
        self.register_buffer("load_counts_E", torch.zeros(config.num_experts), persistent=False)
        # The process group whose ranks together hold one micro-batch (set by moekit.parallel):
        # balance-loss expert fractions are counted over all of its tokens. None: this process only.
        self.batch_group: dist.ProcessGroup | None = None

    def count_loads(self, decision: RoutingDecision) -> None:
        """Add a training forward's expert loads to `load_counts_E` (for `update_expert_bias`)."""
        if self.training:
            with torch.no_grad():
                self.load_counts_E += decision.counts_E.to(self.load_counts_E.dtype)

    def aux_losses(
        self, decision: RoutingDecision, mask_T: Tensor | None, num_sequences: int
    ) -> dict[str, Tensor]:
        """The unweighted aux losses the router's traits name (moekit/traits.py) whose coefficient is > 0.

        Expert choice and Soft MoE are balanced by construction (every expert takes the same number
        of tokens or slots), and hash routing has no learned gate for a loss to train.
        """
        cfg = self.config
        applies = ROUTER_TRAITS[cfg.router].aux_losses
        out: dict[str, Tensor] = {}
        if cfg.load_balance_coef > 0 and "load_balance" in applies:
            out["load_balance"] = losses.load_balance_loss(
                probs_TE=decision.probs_TE,
                selected_TK=decision.selection_TK,
                mask_T=mask_T,
                num_sequences=num_sequences,
                granularity=cfg.load_balance_granularity,
                group=self.batch_group,
            )
        if cfg.z_loss_coef > 0 and "z" in applies:
            out["z"] = losses.z_loss(logits_TE=decision.logits_TE, mask_T=mask_T)
        return out

    def aux_loss(self, aux_losses: dict[str, Tensor]) -> Tensor:
        """The aux losses summed with this layer's coefficients."""
        coefs = {"load_balance": self.config.load_balance_coef, "z": self.config.z_loss_coef}
        total = torch.zeros((), dtype=torch.float32)
        for name, value in aux_losses.items():
            total = total.to(value.device) + coefs.get(name, 1.0) * value
        return total

    @torch.no_grad()
    def update_expert_bias(self, scale: float = 1.0) -> None:
        """Aux-loss-free balancing step (at `scale` x bias_update_rate) from the loads counted since
        the last call; resets them."""
        update = getattr(self.router, "update_bias", None)
        if update is None or getattr(self.router, "expert_bias", None) is None:
            raise ValueError("update_expert_bias needs MoEConfig(router='topk', expert_bias=True)")
        update(self.load_counts_E, scale)
        self.load_counts_E.zero_()


class MoELayer(RoutedLayer):
    """A Mixture-of-Experts feed-forward layer: router -> sort dispatch -> experts -> combine.

    Args:
        config: the layer's MoEConfig.
        router / experts / dispatcher: prebuilt parts (tests inject fixed routers this way).
    Forward:
        x: (B, S, D) or (T, D), the experts' dtype (or any float dtype under autocast).
        mask: (B, S) or (T,) bool, True for real tokens (an integer 0/1 mask is converted; other
            masks are refused, see moekit/inputs.py).
        token_ids: (B, S) or (T,) long, needed by hash routing.
        causal: True when a token must not depend on later tokens (decoders). Every router this
            layer takes routes each token on its own at least in eval mode, except expert choice,
            which ranks over the batch (see moekit/traits.py); Soft MoE is `SoftMoELayer`.
        aux: False skips the aux losses (decoding: aux_losses is then empty).
        Returns MoEOutput(y (same shape and dtype as x), aux_losses {"load_balance", "z"}, decision).
    """

    mixes_sequences = False  # SoftMoELayer sets True

    def __init__(
        self,
        config: MoEConfig,
        *,
        router: Router | None = None,
        experts: nn.Module | None = None,
        dispatcher: SortDispatcher | None = None,
    ) -> None:
        super().__init__(config, router)
        if ROUTER_TRAITS[config.router].causal == "sequence" and not self.mixes_sequences:
            raise ValueError(f"router={config.router!r} mixes the tokens of a sequence: build it as "
                             f"moekit.SoftMoELayer(config), an encoder layer, not MoELayer")
        self.experts = experts if experts is not None else Experts(config)
        self.dispatcher = dispatcher if dispatcher is not None else SortDispatcher()
        self.shared_experts = (
            DenseMLP(config.d_model, config.shared_width, config.activation)
            if config.num_shared_experts else None
        )
        self.shared_expert_gate = (
            nn.Linear(config.d_model, 1, bias=False) if config.shared_expert_gate else None
        )
        self.dense_residual = (
            DenseMLP(config.d_model, config.dense_residual_d_ff, config.activation)
            if config.dense_residual_d_ff else None
        )

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        token_ids: Tensor | None = None,
        causal: bool = False,
        aux: bool = True,
    ) -> MoEOutput:
        x_TD, mask_T, token_ids_T, num_sequences = self.flat_inputs(x, mask, token_ids)
        decision = self.route(x_TD, token_ids_T=token_ids_T, mask_T=mask_T, num_sequences=num_sequences)
        y_TD = self.few_rows(x_TD, decision)
        if y_TD is None:
            x_RD, counts_E, plan = self.dispatcher.dispatch(x_TD, decision)
            y_RD = self.experts(x_RD, counts_E)
            y_TD = self.dispatcher.combine(y_RD, plan)
        return self.finish(x, x_TD, y_TD, decision, mask_T, num_sequences, aux=aux)

    def few_rows(self, x_TD: Tensor, decision: RoutingDecision) -> Tensor | None:
        """Few rows per expert (a decode step; many experts with a row or two each) without
        dispatching: each slot's output from the experts' `slot_outputs` (a CPU kernel reading each
        selected expert's weights once), summed with the routing weights in fp32. None (dispatch as
        usual) for more rows than the experts' decode path takes and more than `KERNEL_MEAN_ROWS`
        per expert, with autograd, another dispatcher (expert parallelism), or experts without it."""
        slot_outputs = getattr(self.experts, "slot_outputs", None)
        ids_TK = decision.expert_ids_TK
        rows = ids_TK.numel()
        few = rows <= max(getattr(self.experts, "decode_max_rows", 0),
                          KERNEL_MEAN_ROWS * getattr(self.experts, "num_experts", 0))
        if (slot_outputs is None or torch.is_grad_enabled() or type(self.dispatcher) is not SortDispatcher
                or not (0 < rows and few) or torch.compiler.is_compiling()):
            return None
        o_TKD = slot_outputs(x_TD, ids_TK)
        if o_TKD is None:
            return None
        return combine_slots(o_TKD, decision.weights_TK).to(x_TD.dtype)

    def flat_inputs(
        self, x: Tensor, mask: Tensor | None, token_ids: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
        """Checked, flattened inputs: (x_TD with padded rows zeroed, bool mask_T or None, token_ids_T
        or None, number of sequences)."""
        D = self.config.d_model
        if x.shape[-1] != D or x.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__} expects input (B, S, {D}) or (T, {D}); got {tuple(x.shape)}")
        weight = next(self.experts.parameters(), None)
        if weight is not None:
            check_float_input(x, weight)
        lead = x.shape[:-1]
        mask_T = self._flat(bool_mask(mask), lead, "mask")
        token_ids_T = self._flat(token_ids, lead, "token_ids")
        x_TD = x.reshape(-1, D)
        if mask_T is not None:
            # Padded rows are replaced by zeros (selection, not multiplication), so a NaN or a huge
            # value there reaches no logit, loss, statistic or gradient.
            x_TD = torch.where(mask_T[:, None], x_TD, 0.0)
        return x_TD, mask_T, token_ids_T, lead[0] if x.dim() == 3 else 1

    def finish(self, x: Tensor, x_TD: Tensor, y_TD: Tensor, decision: RoutingDecision,
               mask_T: Tensor | None, num_sequences: int, *, aux: bool = True) -> MoEOutput:
        """Add the shared/dense parts, count the loads, compute the aux losses (with `aux`), restore
        x's shape."""
        dense = self.dense_parts(x_TD)
        if not isinstance(dense, float):
            y_TD = y_TD + dense
        self.count_loads(decision)
        losses = self.aux_losses(decision, mask_T, num_sequences) if aux else {}
        return MoEOutput(y=y_TD.reshape(x.shape), aux_losses=losses, decision=decision)

    def route(
        self,
        x_TD: Tensor,
        *,
        token_ids_T: Tensor | None = None,
        mask_T: Tensor | None = None,
        num_sequences: int = 1,
    ) -> RoutingDecision:
        """Router decision for flat tokens, with capacity dropping when configured.

        num_sequences: how many equal sequences x_TD holds (capacity_group="sequence" counts each
        expert's capacity per sequence).
        """
        cfg = self.config
        decision = self.router(x_TD, token_ids_T=token_ids_T, mask_T=mask_T)
        if cfg.capacity_factor is not None or cfg.expert_capacity is not None:
            groups = num_sequences if cfg.capacity_group == "sequence" else 1
            T = x_TD.shape[0] if mask_T is None else int(mask_T.sum())
            capacity = cfg.expert_capacity or expert_capacity(
                math.ceil(T / groups), cfg.top_k, cfg.num_experts, cfg.capacity_factor)
            decision = apply_capacity(decision, capacity=capacity, policy=cfg.drop_policy,
                                      num_groups=groups)
        return decision

    def dense_parts(self, x_TD: Tensor) -> Tensor | float:
        """Shared experts (optionally sigmoid-gated) plus the dense residual MLP, or 0."""
        out: Tensor | float = 0.0
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out = out + shared_TD
        if self.dense_residual is not None:
            out = out + self.dense_residual(x_TD)
        return out

    @staticmethod
    def _flat(t: Tensor | None, lead: torch.Size, name: str) -> Tensor | None:
        if t is None:
            return None
        if tuple(t.shape) != tuple(lead):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(lead)} to match the input")
        return t.reshape(-1)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """A model's MoE layers in depth order (`model.moe_layers()` when the model provides it)."""
    if hasattr(model, "moe_layers"):
        return list(model.moe_layers())
    return [m for m in model.modules() if isinstance(m, MoELayer)]
