"""`moekit sweep`: the experts scaling curve at identical active compute (Switch Transformer, Fig. 1).

Every point has the same attention, embedding, data, seed set and active FFN width per token; the
points differ only in the number (and, with granularity, the size) of experts. A point with E
experts, top-k k and granularity g splits each of E experts of width `active_d_ff / k` into g
finer ones (DeepSeekMoE): E*g experts of width `active_d_ff / (k*g)`, each token routed to k*g of
them, so k*g*width = active_d_ff always. E = 1 is the dense model (one expert that every token
uses is a dense MLP). FLOPs per token count the router (`series.flops_per_token`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moekit.config import MoEConfig, check
from moekit.model.config import ModelConfig
from moekit.train.compare import DEFAULT_TRAIN, DEFAULT_VARIANT_LR, EVAL_SEQUENCES
from moekit.train.runfolder import RunLock
from moekit.train.series import RunSpec, check_seeds, train_series
from moekit.train.trainer import TrainConfig

if TYPE_CHECKING:
    from moekit.parallel.context import SingleProcess

# A short run per point: 4 points x 3 seeds x 300 steps is about the default `moekit compare`'s
# 3 x 1000 steps. Validation on compare's fixed evenly spaced sample (eval_sequences 0: all).
# Peak learning rates: compare's tuned recipe (README, "Compare"): the MoE points at compare's `lr`
# (6e-3, the MoEs' best of 3e-3, 6e-3, 1.2e-2), the dense point (E = 1, the same model as compare's
# dense variant) at compare's dense rate (1.2e-2, its best of those and 2.4e-2).
SWEEP_TRAIN = TrainConfig(steps=300, batch_size=16, seq_len=128, lr=DEFAULT_TRAIN.lr, warmup_steps=30,
                          eval_every=50, eval_sequences=EVAL_SEQUENCES, checkpoint_every=0, keep_last=1, seed=0)
SWEEP_DENSE_LR = dict(DEFAULT_VARIANT_LR)["dense"]
SWEEP_TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "eval_every", "eval_sequences",
                     "router_lr_mult", "bias_update_schedule")
Balance = Literal["topk_lb", "aux_free"]


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """The shared shape, the axes of the sweep, and the training run of every point.

    Args:
        active_d_ff: feed-forward width one token uses (the dense model's d_ff) at every point.
        experts / top_k / granularity / shared: the axes; every combination is a point (E = 1 once,
            dense). shared 1: one of the top_k x granularity active experts is a shared expert every
            token uses (DeepSeekMoE), the others routed; it needs top_k x granularity >= 2.
        balance: topk_lb (softmax top-k + load-balancing loss) or aux_free (sigmoid scores +
            aux-loss-free expert bias, DeepSeek-V3).
        seeds: every point trains once per seed.
        dense_lr: peak learning rate of the dense point (E = 1); the MoE points train at `train.lr`.
    """

    vocab_size: int = 2048
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    active_d_ff: int = 256
    experts: tuple[int, ...] = (1, 4, 16, 64)
    top_k: tuple[int, ...] = (1,)
    granularity: tuple[int, ...] = (1,)
    shared: tuple[int, ...] = (0,)
    balance: Balance = "topk_lb"
    load_balance_coef: float = 1e-2
    bias_update_rate: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    dense_lr: float = SWEEP_DENSE_LR
    train: TrainConfig = SWEEP_TRAIN

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "active_d_ff"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        for name in ("experts", "top_k", "granularity"):
            values = getattr(self, name)
            check(isinstance(values, tuple) and values and all(isinstance(v, int) and v >= 1 for v in values)
                  and len(set(values)) == len(values), name, values,
                  "must be one or more different positive integers")
        check(isinstance(self.shared, tuple) and self.shared and set(self.shared) <= {0, 1}
              and len(set(self.shared)) == len(self.shared), "shared", self.shared,
              "must be 0 (no shared expert) and/or 1, each once")
        check(self.balance in ("topk_lb", "aux_free"), "balance", self.balance, "must be topk_lb or aux_free")
        check(isinstance(self.train, TrainConfig), "train", self.train, "must be a TrainConfig")
        check(isinstance(self.dense_lr, (int, float)) and math.isfinite(self.dense_lr) and self.dense_lr > 0,
              "dense_lr", self.dense_lr, "must be a finite number > 0 (the dense point's peak learning rate)")
        check_seeds(list(self.seeds))
        for k in self.top_k:
            for g in self.granularity:
                check(self.active_d_ff % (k * g) == 0, "active_d_ff", self.active_d_ff,
                      f"must be divisible by top_k x granularity = {k} x {g} (the active experts share it)")
        if 1 in self.shared and not any(k * g >= 2 for k in self.top_k for g in self.granularity):
            raise ValueError(f"shared=1 needs top_k x granularity >= 2 (one shared expert and at least one "
                             f"routed); with top_k={self.top_k} and granularity={self.granularity} there is "
                             f"none; add --granularity 2 or more, or --top-k 2 or more")
        if not self.points():
            raise ValueError(f"experts={self.experts} with top_k={self.top_k} gives no point: every MoE "
                             f"point needs top_k < experts; add more experts or a smaller --top-k")

    def points(self) -> list[SweepPoint]:
        """The points, dense (E = 1) first, then by experts, top-k, granularity, shared; top_k >= E
        skipped, and a shared expert where it would leave no routed one (top_k x granularity = 1)."""
        out = [SweepPoint(1, 1, 1)] if 1 in self.experts else []
        out += [SweepPoint(e, k, g, sh) for e in sorted(self.experts) if e > 1
                for k in sorted(self.top_k) if k < e for g in sorted(self.granularity)
                for sh in sorted(self.shared) if not (sh and k * g < 2)]
        return out

    def lr(self, point: SweepPoint) -> float:
        """The peak learning rate `point` trains with: `dense_lr` for E = 1, else `train.lr`."""
        return self.dense_lr if point.experts == 1 else self.train.lr

    def settings(self) -> dict:
        shape = {k: v for k, v in asdict(self).items()
                 if k not in ("train", "experts", "top_k", "granularity", "shared")}
        return {**shape, **asdict(self.train)}


@dataclass(frozen=True)
class SweepPoint:
    experts: int
    top_k: int
    granularity: int
    shared: int = 0

    @property
    def name(self) -> str:
        if self.experts == 1:
            return "dense"
        return f"E{self.experts}_k{self.top_k}_g{self.granularity}" + ("_s1" if self.shared else "")

    def describe(self, c: SweepConfig) -> str:
        if self.experts == 1:
            return f"dense MLP of width {c.active_d_ff} (E = 1); peak lr {c.lr(self):g}"
        e, k = self.experts * self.granularity, self.top_k * self.granularity
        experts = (f"1 shared + {e} routed experts of width {c.active_d_ff // k}, top-{k - 1}" if self.shared
                   else f"{e} experts of width {c.active_d_ff // k}, top-{k}")
        return (f"{experts} ({self.experts} x granularity {self.granularity}), "
                f"{'load-balancing loss' if c.balance == 'topk_lb' else 'aux-loss-free bias'}; peak lr {c.lr(self):g}")

    def moe(self, c: SweepConfig) -> MoEConfig | None:
        if self.experts == 1:
            return None
        k = self.top_k * self.granularity
        # Top-1 weights its expert by the router's probability (Switch Transformer): renormalised over
        # one expert that weight would be exactly 1, and the router would get no gradient from the loss.
        # A shared expert takes one of the k active widths: the token's other k - 1 are routed.
        routed_k = k - self.shared
        base = dict(d_model=c.d_model, d_ff=c.active_d_ff // k, num_experts=self.experts * self.granularity,
                    top_k=routed_k, normalize_topk=routed_k > 1, num_shared_experts=self.shared)
        if c.balance == "aux_free":
            return MoEConfig(**base, score_func="sigmoid", expert_bias=True, load_balance_coef=0.0,
                             bias_update_rate=c.bias_update_rate)
        return MoEConfig(**base, load_balance_coef=c.load_balance_coef)

    def model(self, c: SweepConfig) -> ModelConfig:
        moe = self.moe(c)
        return ModelConfig(vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads,
                           max_seq_len=c.train.seq_len, d_ff=c.active_d_ff, moe=moe,
                           moe_layers="all" if moe is not None else "none", tie_embeddings=True)


def run_sweep(config: SweepConfig, *, out_dir: str | Path, corpus: str | Path | None = None,
              cache_dir: Path | None = None, progress: bool = True,
              parallel: SingleProcess | None = None) -> Path:
    """Train every point at every seed into `out_dir/runs/` (resuming what it finds) and write the
    report into `out_dir/report`; returns that folder. Holds a RunLock on `out_dir`."""
    from moekit.parallel import SingleProcess
    from moekit.train.compare import open_series
    from moekit.train.sweep_report import write_sweep_report

    parallel = parallel if parallel is not None else SingleProcess()
    out_dir = Path(out_dir)
    with RunLock(out_dir) if parallel.is_writer else nullcontext():
        progress = progress and parallel.is_writer
        data, config, validation = open_series(config, corpus, out_dir=out_dir, cache_dir=cache_dir,
                                               parallel=parallel, progress=progress)
        # the base seed first for every point, so a stopped sweep already has one curve per point
        specs = [RunSpec(p.name, seed, p.model(config), p.describe(config), lr=config.lr(p))
                 for seed in config.seeds for p in config.points()]
        train = replace(config.train, seed=config.seeds[0])
        runs = train_series(specs, train=train, data=data, out_dir=out_dir, progress=progress,
                            parallel=parallel)
        for point in config.points():
            runs[point.name]["point"] = point
        parallel.on_writer(lambda: write_sweep_report(out_dir / "report", runs, config=config.settings(),
                                                      corpus=data.corpus.describe(names_shown=None), validation=validation))
    return out_dir / "report"
