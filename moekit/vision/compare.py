"""`moekit compare --task vision`: a dense ViT against ViT-MoE variants at equal active compute.

Every variant has the same shape, data, batches and seed; each token's MLP work equals the dense
MLP of width d_ff: top-k token choice and expert choice use experts d_ff / top_k wide (expert
choice takes T * top_k / E tokens per expert), Soft MoE has experts d_ff wide and E * slots = S
slots per image. After training, the token-choice variants are re-evaluated on the test set as the
capacity factor shrinks, dropping by position and by batch prioritized routing (V-MoE's figure).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moekit.config import MoEConfig, check
from moekit.model.accounting import count_params
from moekit.train.metrics import read_metrics
from moekit.vision.data import ImageData
from moekit.vision.model import ViT, ViTConfig, active_params, flops_per_image
from moekit.vision.train import VisionTrainConfig, capacity, evaluate, to_tensors, train_vision


@dataclass(frozen=True, kw_only=True)
class VisionCompareConfig:
    """Shared shape and budget. Defaults: four variants in about 10 minutes on one thread of a busy
    CPU (patch 7: 16 tokens per image; a patch of 4 gives 49 tokens and about 3x the time)."""

    image_size: int = 28
    patch_size: int = 7
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 128
    num_experts: int = 8
    top_k: int = 2
    pooling: str = "mean"
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 30
    eval_every: int = 40
    val_images: int = 2000
    load_balance_coef: float = 0.01
    train_capacity_factor: float = 1.0  # of the topk_bpr / topk_cap variants
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.d_ff % self.top_k == 0, "d_ff", self.d_ff, f"must be divisible by top_k={self.top_k}")
        check(1 <= self.top_k <= self.num_experts, "top_k", self.top_k,
              f"must be in [1, num_experts={self.num_experts}]")
        self.vit(None)  # validates the shape

    def vit(self, moe: MoEConfig | None) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, d_model=self.d_model,
                         n_layers=self.n_layers, n_heads=self.n_heads, d_ff=self.d_ff,
                         pooling=self.pooling, moe=moe)  # type: ignore[arg-type]

    def train_config(self) -> VisionTrainConfig:
        return VisionTrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                 warmup_steps=self.warmup_steps, eval_every=self.eval_every,
                                 val_images=self.val_images, seed=self.seed)


def _moe(c: VisionCompareConfig, **changes) -> MoEConfig:
    base = dict(d_model=c.d_model, d_ff=c.d_ff // c.top_k, num_experts=c.num_experts, top_k=c.top_k,
                activation="gelu", expert_mlp_bias=True, load_balance_coef=c.load_balance_coef)
    return MoEConfig(**{**base, **changes})


def _soft(c: VisionCompareConfig) -> MoEConfig:
    seq_len = c.vit(None).seq_len
    return _moe(c, router="soft", d_ff=c.d_ff, top_k=1, soft_slots=max(1, math.ceil(seq_len / c.num_experts)),
                load_balance_coef=0.0)


@dataclass(frozen=True)
class Variant:
    description: str
    moe: Callable[[VisionCompareConfig], MoEConfig | None]


VARIANTS: dict[str, Variant] = {
    "dense": Variant("dense ViT, GELU MLPs of width d_ff (the FLOP-matched baseline)", lambda c: None),
    "topk": Variant("top-k token choice, dropless, load-balancing loss; experts d_ff / k wide",
                    lambda c: _moe(c)),
    "topk_bpr": Variant("top-k with capacity factor train_capacity_factor and batch prioritized routing",
                        lambda c: _moe(c, capacity_factor=c.train_capacity_factor,
                                       drop_policy="batch_priority")),
    "topk_cap": Variant("top-k with capacity factor train_capacity_factor, dropping by position",
                        lambda c: _moe(c, capacity_factor=c.train_capacity_factor)),
    "expert_choice": Variant("experts pick their top T*k/E tokens of the batch (Zhou et al. 2022)",
                             lambda c: _moe(c, router="expert_choice", load_balance_coef=0.0)),
    "soft": Variant("Soft MoE (Puigcerver et al. 2023): E * slots ~ S slots per image, experts d_ff wide",
                    _soft),
}
DEFAULT_VARIANTS = ("dense", "topk", "expert_choice", "soft")
SWEEP_FACTORS = (2.0, 1.5, 1.0, 0.75, 0.5, 0.25, 0.125)
SWEEP_POLICIES = ("position", "batch_priority")


def check_variants(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown vision variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"variants {names} repeat a name; list each once")
    return names


@torch.no_grad()
def capacity_sweep(model: ViT, split, factors=SWEEP_FACTORS, policies=SWEEP_POLICIES,
                   batch: int = 500) -> dict[str, list[dict]]:
    """Test accuracy and dropped fraction at each capacity factor, per drop policy."""
    out: dict[str, list[dict]] = {}
    for policy in policies:
        out[policy] = []
        for factor in factors:
            with capacity(model, factor, policy):
                r = evaluate(model, split, batch=batch)
            out[policy].append({"capacity_factor": factor, "accuracy": r["accuracy"],
                                "dropped_fraction": r["dropped_fraction"]})
    return out


def run_vision_compare(config: VisionCompareConfig, data: ImageData, *, variants: list[str],
                       out_dir: str | Path, progress: bool = True,
                       sweep_factors: tuple[float, ...] = SWEEP_FACTORS) -> Path:
    """Train each variant into out_dir/runs/<name> (a finished run is reused), then write the report."""
    from moekit.vision.report import write_vision_report

    check_variants(variants)
    out_dir = Path(out_dir)
    if data.num_classes > 10 or data.image_size != (config.image_size, config.image_size):
        raise ValueError(f"{data.describe()}: the comparison is set up for {config.image_size}x"
                         f"{config.image_size} images and at most 10 classes; pass --image-size")
    _, _, test = to_tensors(data, config.val_images)
    train_config = config.train_config()
    runs = {}
    for name in variants:
        vit = config.vit(VARIANTS[name].moe(config))
        torch.manual_seed(config.seed)
        model = ViT(vit)
        run_dir = out_dir / "runs" / name
        if progress:
            print(f"{name}: {VARIANTS[name].description}; {count_params(model):,} parameters, "
                  f"{active_params(model):,} active, {flops_per_image(vit) / 1e6:.2f} MFLOP/image")
        if (run_dir / "model.safetensors").is_file():
            from safetensors.torch import load_file

            saved = json.loads((run_dir / "run.json").read_text())
            if saved["model"] != vit.to_dict() or saved["train"] != asdict(train_config):
                raise ValueError(f"{run_dir} holds a finished run with other settings; rerun with the "
                                 f"same settings or choose a new --out (nothing was overwritten)")
            model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
        else:
            if (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()  # an unfinished run restarts from step 0
            train_vision(model, data, train_config, out_dir=run_dir, progress=progress, label=f"{name:>14}",
                         run_info={"variant": name})
        final = evaluate(model, test, usage=True)
        runs[name] = {
            "metrics": read_metrics(run_dir / "metrics.jsonl"),
            "description": VARIANTS[name].description,
            "total_params": count_params(model),
            "active_params": active_params(model),
            "flops_per_image": flops_per_image(vit),
            "class_expert_usage": final.get("class_expert_usage", []),
            "router": None if vit.moe is None else vit.moe.router,
            "sweep": (capacity_sweep(model, test, sweep_factors)
                      if vit.moe is not None and vit.moe.router in ("topk", "sinkhorn") else None),
        }
    return write_vision_report(out_dir / "report", runs, config=asdict(config), data=data.describe())
