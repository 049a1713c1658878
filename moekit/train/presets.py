"""Training presets: a model shape and training settings that fit a small CPU budget.

`tiny` trains 300 steps in about 20 seconds on 2 CPU cores; `small` is a longer run.
`catalog:NAME` takes an architecture from `moekit.catalog` scaled down to the `tiny` budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moekit.config import MoEConfig
from moekit.model.config import ModelConfig
from moekit.train.trainer import TrainConfig


@dataclass(frozen=True)
class Preset:
    """A named recipe: `model(vocab_size)` builds the ModelConfig; `train` holds the defaults."""

    name: str
    description: str
    model: Callable[[int], ModelConfig]
    train: TrainConfig
    vocab_size: int
    hf_model_type: str | None = None  # the Hugging Face family the final weights are saved as


def _tiny_model(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, d_ff=128,
        moe=MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=2, load_balance_coef=0.01),
    )


def _tiny_dense_model(vocab_size: int) -> ModelConfig:
    """`tiny` with dense MLPs as wide as one of its experts: the parent for sparse upcycling."""
    moe_config = _tiny_model(vocab_size)
    assert moe_config.moe is not None
    return moe_config.replace(moe=None, moe_layers="none", d_ff=moe_config.moe.d_ff)


def _small_model(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4, max_seq_len=128, d_ff=512,
        moe=MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=2, load_balance_coef=0.01),
    )


_TINY_TRAIN = TrainConfig(steps=300, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20,
                          eval_every=50, checkpoint_every=100)
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "2 layers, d_model 64, 4 experts top-2; 300 steps in ~20 s on 2 CPU cores",
                   _tiny_model, _TINY_TRAIN, vocab_size=1024, hf_model_type="mixtral"),
    "tiny-dense": Preset("tiny-dense", "tiny with dense MLPs of one expert's width (an upcycling parent)",
                         _tiny_dense_model, _TINY_TRAIN, vocab_size=1024, hf_model_type=None),
    "small": Preset("small", "4 layers, d_model 128, 8 experts top-2; 1000 steps of 2048 tokens",
                    _small_model, TrainConfig(steps=1000, batch_size=16, seq_len=128, lr=2e-3,
                                              warmup_steps=50, eval_every=100, checkpoint_every=200),
                    vocab_size=2048, hf_model_type="mixtral"),
}


def catalog_preset(name: str) -> Preset:
    """A decoder-only catalog architecture at tiny width (the catalog picks the fewest layers that
    keep its layer pattern), with the `tiny` training budget."""
    from moekit import catalog

    base = PRESETS["tiny"]
    tiny = base.model(base.vocab_size)
    entry = catalog.get(name)  # a ValueError listing the known names if NAME is unknown

    def model(vocab_size: int) -> ModelConfig:
        scaled = entry.scaled(d_model=tiny.d_model, num_experts=8,
                              vocab_size=vocab_size).config
        if not isinstance(scaled, ModelConfig):
            raise ValueError(f"catalog:{name} is an encoder-decoder model; `moekit train` trains "
                             f"decoder-only language models")
        return scaled.replace(max_seq_len=base.train.seq_len)

    model(base.vocab_size)  # fail now rather than after tokenizing the corpus
    return Preset(f"catalog:{entry.name}", f"{entry.name} scaled to the tiny budget", model, base.train,
                  base.vocab_size)


def get_preset(name: str) -> Preset:
    """`tiny`, `small`, or `catalog:NAME`; a ValueError lists the choices otherwise."""
    if name.startswith("catalog:"):
        return catalog_preset(name.split(":", 1)[1])
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or catalog:NAME "
                         f"(see `moekit catalog`)")
    return PRESETS[name]
