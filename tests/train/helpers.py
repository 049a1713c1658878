"""A tiny, fully specified training setup on the committed fixture (tests and the golden script)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moekit.config import MoEConfig
from moekit.model.config import ModelConfig
from moekit.train.run import build_model, config_json, prepare_data
from moekit.train.trainer import TrainConfig, Trainer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare_mini"
VOCAB_SIZE = 300
SEQ_LEN = 16


def tiny_model_config(vocab_size: int = VOCAB_SIZE, **moe_changes) -> ModelConfig:
    """2 layers, d_model 32; the MoE uses noisy gating (exercises the RNG) and an expert bias."""
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, noisy_gating=True, expert_bias=True,
                    bias_update_rate=0.01, load_balance_coef=0.01, z_loss_coef=0.001)
    return ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ_LEN,
                       d_ff=64, moe=replace(moe, **moe_changes) if moe_changes else moe)


def tiny_train_config(**changes) -> TrainConfig:
    base = TrainConfig(steps=8, batch_size=4, seq_len=SEQ_LEN, grad_accum=2, lr=1e-2, warmup_steps=2,
                       eval_every=4, eval_sequences=8, checkpoint_every=4, keep_last=2, seed=0)
    return replace(base, **changes)


_DATA_CACHE: dict = {}


def fixture_data():
    if "data" not in _DATA_CACHE:
        _DATA_CACHE["data"] = prepare_data(FIXTURE, seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE)
    return _DATA_CACHE["data"]


def make_trainer(out_dir: Path, *, model_config: ModelConfig | None = None, init_seed: int = 0,
                 **train_changes) -> Trainer:
    data = fixture_data()
    model_config = model_config or tiny_model_config()
    model = build_model(model_config, seed=init_seed)
    return Trainer(model, config=tiny_train_config(**train_changes), train=data.train, val=data.val,
                   out_dir=out_dir, run_info={"model": config_json(model_config)}, progress=False)


def golden_run(out_dir: Path) -> dict:
    """The short deterministic run whose losses tests/train/golden/tiny_losses.json records."""
    import torch

    from moekit.train.metrics import read_metrics

    make_trainer(out_dir, steps=6, checkpoint_every=0, eval_every=3).fit()
    records = read_metrics(out_dir / "metrics.jsonl")
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "losses": [r["loss"] for r in records],
            "val_losses": [r["val_loss"] for r in records if "val_loss" in r],
            "grad_norms": [r["grad_norm"] for r in records]}
