"""`moekit compare`: train a dense model and MoE variants at equal active compute, then report.

Every variant sees the same tokenizer, batches and seed, and has the same active parameters and
FLOPs per token: a top-k variant's experts are `active_d_ff / k` wide, so that k of them do the work
of the dense MLP of width `active_d_ff` (and a shared expert takes its share of that width).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from moekit.config import MoEConfig, check, check_choice
from moekit.model.config import ModelConfig
from moekit.traits import ROUTER_TRAITS
from moekit.train.batches import eval_indices
from moekit.train.run import PreparedData, prepare_data
from moekit.train.runfolder import RunLock
from moekit.train.series import RunSpec, check_seeds, train_series
from moekit.train.tokenizer import save_tokenizer
from moekit.train.trainer import TrainConfig

# The training budget of a comparison: every variant runs exactly this. No intermediate checkpoints
# (a finished variant is resumed from its last one), one kept. Validation: a fixed sample of
# EVAL_SEQUENCES sequences evenly spaced over the held-out set (eval_sequences 0: all of them;
# Shakespeare's two held-out plays are 651 sequences, whose whole-set evaluation every 50 steps
# took ~19% of the run's CPU time).
EVAL_SEQUENCES = 256
# Peak learning rates: each default variant at its best of 3e-3, 6e-3, 1.2e-2 (and 2.4e-2 for dense)
# in 300-step screening runs on Shakespeare (README, "Compare"): 6e-3 for the MoEs (`--lr`), 1.2e-2
# for the dense model (DEFAULT_VARIANT_LR), so that the baseline is tuned as carefully as the MoEs.
DEFAULT_TRAIN = TrainConfig(steps=1000, batch_size=16, seq_len=128, lr=6e-3, warmup_steps=30, eval_every=50,
                            eval_sequences=EVAL_SEQUENCES, checkpoint_every=0, keep_last=1, seed=0)
DEFAULT_VARIANT_LR: tuple[tuple[str, float], ...] = (("dense", 1.2e-2),)
# TrainConfig fields `moekit compare` takes as flags (the rest keep DEFAULT_TRAIN's values)
TRAIN_FLAGS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "eval_every", "eval_sequences", "seed",
               "router_lr_mult", "bias_update_schedule")

if TYPE_CHECKING:
    from moekit.parallel.context import SingleProcess
    from moekit.train.sweep import SweepConfig


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """The shared shape and budget of a comparison.

    Args:
        active_d_ff: feed-forward width one token uses (the dense model's d_ff).
        num_experts: routed experts per MoE layer.
        top_k: experts per token of the top-k variants, each active_d_ff / top_k wide
            (fine-grained experts when > 2, as in DeepSeekMoE).
        bias_update_rate: step of the aux-loss-free bias update (DeepSeek-V3's gamma).
        load_balance_coef: coefficient of the load-balancing loss where a variant uses it.
        load_balance_granularity: that loss per micro-batch, per sequence or over the global batch.
        aux_free_balance_coef: aux-loss-free variants' complementary sequence-wise balance loss
            (DeepSeek-V3's alpha, 1e-4 there; 0 turns it off).
        z_loss_coef: ST-MoE router z-loss on every MoE variant (0 turns it off).
        routed_scaling_factor: multiplies the routed experts' combine weights of every variant whose
            router weights its experts (DeepSeek-V2/V3's factor; top_k gives each of k experts,
            weighted ~1/k, the dense model's output scale at initialisation).
        variant_lr: (variant, peak learning rate) pairs overriding `train.lr` for those variants,
            so that each can train at its own best learning rate (default: the dense model at 1.2e-2).
        train: the training run every variant gets (steps, batch, sequence length, schedule, seed).
    """

    # A small d_model keeps the dense model capacity-bound within ~1M training tokens, where 16
    # experts' extra parameters can show (d_model 128 with 600 steps barely separated the curves).
    vocab_size: int = 2048
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    active_d_ff: int = 256
    num_experts: int = 32
    top_k: int = 4
    bias_update_rate: float = 3e-3
    load_balance_coef: float = 1e-2
    load_balance_granularity: str = "micro_batch"
    aux_free_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    routed_scaling_factor: float = 1.0
    variant_lr: tuple[tuple[str, float], ...] = DEFAULT_VARIANT_LR
    train: TrainConfig = DEFAULT_TRAIN

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "active_d_ff", "num_experts"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        check(isinstance(self.train, TrainConfig), "train", self.train, "must be a TrainConfig")
        check(2 <= self.top_k <= self.num_experts, "top_k", self.top_k,
              f"must be in [2, num_experts={self.num_experts}]")
        check(self.active_d_ff % self.top_k == 0, "active_d_ff", self.active_d_ff,
              f"must be divisible by top_k={self.top_k} (the experts share it)")
        check_choice(self.load_balance_granularity, "load_balance_granularity",
                     ("micro_batch", "sequence", "global"))
        for name in ("load_balance_coef", "aux_free_balance_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, value,
                  "must be a finite number >= 0")
        check(isinstance(self.routed_scaling_factor, (int, float)) and math.isfinite(self.routed_scaling_factor)
              and self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor,
              "must be a finite number > 0")
        check(isinstance(self.variant_lr, tuple), "variant_lr", self.variant_lr,
              "must be a tuple of (variant, lr) pairs")
        for pair in self.variant_lr:
            check(isinstance(pair, tuple) and len(pair) == 2 and pair[0] in VARIANTS
                  and isinstance(pair[1], (int, float)) and math.isfinite(pair[1]) and pair[1] > 0,
                  "variant_lr", pair, f"each pair is (variant, lr > 0) with a variant from {sorted(VARIANTS)}")
        names = [name for name, _ in self.variant_lr]
        check(len(set(names)) == len(names), "variant_lr", self.variant_lr, "names each variant once")

    def with_variant_lr(self, pairs: tuple[tuple[str, float], ...]) -> CompareConfig:
        """This config with `pairs` setting those variants' learning rates (the other pairs kept)."""
        given = dict(pairs)
        kept = tuple((n, lr) for n, lr in self.variant_lr if n not in given)
        return replace(self, variant_lr=kept + tuple(pairs))

    def lr(self, variant: str) -> float:
        """The peak learning rate `variant` trains with: its own from `variant_lr`, else `train.lr`."""
        return dict(self.variant_lr).get(variant, self.train.lr)

    def settings(self) -> dict:
        """Every setting as one flat dict (the shape, then the training run), for the report."""
        shape = {k: v for k, v in asdict(self).items() if k not in ("train", "variant_lr")}
        lrs = {"variant_lr": " ".join(f"{n}={lr:g}" for n, lr in self.variant_lr) or "-"}
        return {**shape, **lrs, **asdict(self.train)}


def _topk(c: CompareConfig, width_k: int, **changes) -> MoEConfig:
    """MoEConfig of experts active_d_ff / width_k wide, top-width_k unless `changes` says otherwise."""
    base = dict(d_model=c.d_model, d_ff=c.active_d_ff // width_k, num_experts=c.num_experts, top_k=width_k,
                load_balance_coef=c.load_balance_coef, load_balance_granularity=c.load_balance_granularity,
                z_loss_coef=c.z_loss_coef)
    if ROUTER_TRAITS[changes.get("router", "topk")].scales_weights:
        base["routed_scaling_factor"] = float(c.routed_scaling_factor)
    return MoEConfig(**{**base, **changes})


def _aux_free_loss(c: CompareConfig) -> dict:
    """An aux-loss-free variant's balance loss: only DeepSeek-V3's complementary sequence-wise one
    (none by default; the MoEConfig then keeps its default granularity)."""
    if c.aux_free_balance_coef == 0:
        return {"load_balance_coef": 0.0}
    return {"load_balance_coef": c.aux_free_balance_coef, "load_balance_granularity": "sequence"}


@dataclass(frozen=True)
class Variant:
    description: str
    moe: Callable[[CompareConfig], MoEConfig | None]
    balanced: bool = True  # counts toward the "balanced MoE beats dense" target


VARIANTS: dict[str, Variant] = {
    "dense": Variant("dense MLP of width active_d_ff (the FLOP-matched baseline)", lambda c: None, False),
    "topk_lb": Variant("top-k softmax + load-balancing loss (GShard, Mixtral)", lambda c: _topk(c, c.top_k)),
    "aux_free": Variant(
        "top-k sigmoid scores + aux-loss-free expert bias (DeepSeek-V3)",
        lambda c: _topk(c, c.top_k, score_func="sigmoid", expert_bias=True, **_aux_free_loss(c),
                        bias_update_rate=c.bias_update_rate)),
    "aux_free_softmax": Variant(
        "top-k softmax + aux-loss-free expert bias",
        lambda c: _topk(c, c.top_k, expert_bias=True, **_aux_free_loss(c),
                        bias_update_rate=c.bias_update_rate)),
    # Switch weights each token's expert by its router probability (not renormalised to 1, which
    # would leave the router without a gradient from the loss)
    "switch": Variant("top-1 (Switch), capacity factor 1.25, load-balancing loss; experts top_k x wide",
                      lambda c: _topk(c, 1, capacity_factor=1.25, normalize_topk=False)),
    "noisy_topk": Variant("top-k noisy gating + load-balancing loss (Shazeer et al. 2017)",
                          lambda c: _topk(c, c.top_k, noisy_gating=True)),
    "shared": Variant("1 shared expert + top-(k-1) routed, load-balancing loss (DeepSeekMoE)",
                      lambda c: _topk(c, c.top_k, top_k=c.top_k - 1, num_shared_experts=1)),
    "expert_choice": Variant("experts pick their top-C tokens (Zhou et al. 2022; sees later tokens)",
                             lambda c: _topk(c, c.top_k, router="expert_choice", load_balance_coef=0.0)),
    "hash": Variant("fixed random token-id hash, top-1, experts top_k x wide (Roller et al. 2021)",
                    lambda c: _topk(c, 1, router="hash", hash_vocab_size=c.vocab_size,
                                    load_balance_coef=0.0), balanced=False),
    "sinkhorn": Variant("balanced assignment by Sinkhorn iterations, top-k (BASE-like)",
                        lambda c: _topk(c, c.top_k, router="sinkhorn", load_balance_coef=0.0)),
}
DEFAULT_VARIANTS = ("dense", "topk_lb", "aux_free")


def check_variants(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"variants {names} repeat a name; list each once")
    return names


def model_config(name: str, c: CompareConfig) -> ModelConfig:
    moe = VARIANTS[name].moe(c)
    return ModelConfig(vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads,
                       max_seq_len=c.train.seq_len, d_ff=c.active_d_ff, moe=moe,
                       moe_layers="all" if moe is not None else "none", tie_embeddings=True)


def run_compare(
    config: CompareConfig, *, variants: list[str], out_dir: str | Path, corpus: str | Path | None = None,
    cache_dir: Path | None = None, progress: bool = True, parallel: SingleProcess | None = None,
    seeds: list[int] | None = None,
) -> Path:
    """Train each variant at each seed into `out_dir/runs/` (resuming any it finds) and write the report.

    seeds: the seeds every variant runs with (default: `config.train.seed` alone); the base seed's
    run folder is `runs/<name>`, another seed's `runs/<name>.seed<N>`. Holds a RunLock on `out_dir`
    (RunFolderBusy if another process has it). parallel: the process layout
    (`moekit.parallel.Distributed` under torchrun; rank 0 alone prints, writes and locks).
    Returns the report folder.
    """
    from moekit.parallel import SingleProcess

    parallel = parallel if parallel is not None else SingleProcess()
    check_variants(variants)
    seeds = check_seeds(list(seeds) if seeds is not None else [config.train.seed])
    out_dir = Path(out_dir)
    # one comparison per folder at a time; each variant's run folder too
    with RunLock(out_dir) if parallel.is_writer else nullcontext():
        return _run_compare(config, variants=variants, out_dir=out_dir, corpus=corpus, seeds=seeds,
                            cache_dir=cache_dir, progress=progress and parallel.is_writer, parallel=parallel)


def prepare_series_data(corpus: str | Path | None, *, seq_len: int, vocab_size: int, out_dir: Path,
                        cache_dir: Path | None, parallel: SingleProcess) -> PreparedData:
    """The corpus packed for every run of a series: rank 0 trains the tokenizer, the others read it."""
    holder: dict = {}

    def prepare() -> None:
        holder["data"] = prepare_data(corpus, seq_len=seq_len, vocab_size=vocab_size, out_dir=out_dir,
                                      cache_dir=cache_dir)
        save_tokenizer(holder["data"].tokenizer, out_dir)

    parallel.on_writer(prepare)
    return holder.get("data") or prepare_data(corpus, seq_len=seq_len, vocab_size=vocab_size,
                                              out_dir=out_dir, cache_dir=cache_dir)


def validation_text(data: PreparedData, train: TrainConfig) -> str:
    """What the validation loss and validation MaxVio are measured on, for the report."""
    n = data.val.num_sequences
    used = len(eval_indices(n, train.eval_sequences))
    tokens = used * train.seq_len
    what = (f"the whole held-out set ({n} sequences)" if used == n else
            f"a fixed sample of {used} of the {n} held-out sequences, evenly spaced over it; the final "
            f"step is also evaluated on all {n} ({n * train.seq_len:,} tokens)")
    return f"{used} sequences x {train.seq_len} tokens = {tokens:,} tokens: {what}"


_Series = TypeVar("_Series", "CompareConfig", "SweepConfig")


def open_series(config: _Series, corpus: str | Path | None, *, out_dir: Path, cache_dir: Path | None,
                parallel: SingleProcess, progress: bool) -> tuple[PreparedData, _Series, str]:
    """What a comparison or a sweep trains on: the prepared data, the config with the tokenizer's
    actual vocabulary size (a tiny corpus gives fewer merges than asked for), and the validation
    text, printed with the corpus description when `progress`."""
    data = prepare_series_data(corpus, seq_len=config.train.seq_len, vocab_size=config.vocab_size,
                               out_dir=out_dir, cache_dir=cache_dir, parallel=parallel)
    vocab = data.tokenizer.get_vocab_size()
    if vocab != config.vocab_size:
        config = replace(config, vocab_size=vocab)
    validation = validation_text(data, config.train)
    if progress:
        print(f"{data.corpus.describe()}\nvalidation: {validation}")
    return data, config, validation


def _run_compare(config: CompareConfig, *, variants: list[str], out_dir: Path, corpus: str | Path | None,
                 cache_dir: Path | None, progress: bool, parallel: SingleProcess, seeds: list[int]) -> Path:
    from moekit.train.report import write_report

    data, config, validation = open_series(config, corpus, out_dir=out_dir, cache_dir=cache_dir,
                                           parallel=parallel, progress=progress)
    specs = [RunSpec(name, seed, model_config(name, config),
                     f"{VARIANTS[name].description}; peak lr {config.lr(name):g}", lr=config.lr(name))
             for seed in seeds for name in variants]
    runs = train_series(specs, train=config.train, data=data, out_dir=out_dir, progress=progress,
                        parallel=parallel)
    for name, run in runs.items():
        run["balanced"] = VARIANTS[name].balanced
    settings = {**config.settings(), "seeds": " ".join(map(str, seeds))}
    parallel.on_writer(lambda: write_report(out_dir / "report", runs, config=settings,
                                            corpus=data.corpus.describe(names_shown=None), validation=validation))
    return out_dir / "report"
