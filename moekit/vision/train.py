"""Train and evaluate a (V-MoE) ViT on an image folder: AdamW, warmup + cosine, light augmentation.

The last `val_images` training images are held out for the accuracy curve (steps to a target
accuracy); `test_accuracy` is measured once, at the end, on the whole test split. Batches are a
pure function of (seed, step). Every step appends a record to `metrics.jsonl` in the run folder;
the final model is saved as safetensors beside its config.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from moekit.config import check
from moekit.train.metrics import MetricsLog, Progress, summarize_routing
from moekit.train.trainer import TrainConfig, build_optimizer, lr_at
from moekit.types import RoutingDecision
from moekit.vision.data import ImageData
from moekit.vision.model import ViT


@dataclass(frozen=True, kw_only=True)
class VisionTrainConfig:
    """Optimisation and evaluation settings of one vision run.

    Args:
        steps / batch_size / lr / warmup_steps / weight_decay / grad_clip: AdamW with linear warmup
            then cosine decay to lr * 0.1, as `moekit.train.trainer`.
        eval_every: validation accuracy every N steps (and at the end).
        val_images: training images held out for validation (the last ones).
        augment: random shifts of up to 2 pixels and horizontal flips (off by default: in runs of
            a few hundred steps they slowed learning).
        eval_batch: images per forward when evaluating (expert choice ranks tokens within one batch).
    """

    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 100
    val_images: int = 5000
    augment: bool = False
    eval_batch: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "val_images", "seed"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, name, value, "must be an integer >= 0")
        check(self.lr > 0, "lr", self.lr, "must be > 0")

    def optim(self) -> TrainConfig:
        """The TrainConfig whose schedule and optimizer groups this run shares with LM training."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=1, lr=self.lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                           beta2=0.999, grad_clip=self.grad_clip, seed=self.seed)


@dataclass(frozen=True)
class Tensors:
    """A split as normalised float images (N, H, W) and long labels (N,)."""

    images_NHW: Tensor
    labels_N: Tensor

    def __len__(self) -> int:
        return len(self.labels_N)


def to_tensors(data: ImageData, val_images: int) -> tuple[Tensors, Tensors, Tensors]:
    """(train, val, test), pixels scaled to [0, 1] then standardised by the training mean/std."""
    train_x = torch.from_numpy(data.train.images_NHW.astype(np.float32) / 255.0)
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0
    norm = lambda x: (x - mean) / std  # noqa: E731
    test_x = torch.from_numpy(data.test.images_NHW.astype(np.float32) / 255.0)
    train_y, test_y = torch.from_numpy(data.train.labels_N), torch.from_numpy(data.test.labels_N)
    n_val = min(val_images, len(train_y) // 5)
    cut = len(train_y) - n_val
    return (Tensors(norm(train_x[:cut]), train_y[:cut]), Tensors(norm(train_x[cut:]), train_y[cut:]),
            Tensors(norm(test_x), test_y))


def batch_at(step: int, split: Tensors, config: VisionTrainConfig) -> tuple[Tensor, Tensor]:
    """The images and labels of optimizer step `step`: epoch-wise shuffles from (seed, epoch)."""
    n, B = len(split.labels_N), config.batch_size
    per_epoch = max(n // B, 1)
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    idx = torch.randperm(n, generator=g)[offset * B: offset * B + B]
    x, y = split.images_NHW[idx], split.labels_N[idx]
    if config.augment:
        g = torch.Generator().manual_seed(config.seed * 7_919 + step)
        x = augment(x, g)
    return x, y


def augment(x_NHW: Tensor, g: torch.Generator, shift: int = 2) -> Tensor:
    """Random translation by up to `shift` pixels (background fill) and random horizontal flips."""
    N, H, W = x_NHW.shape
    fill = float(x_NHW.min())
    padded = F.pad(x_NHW, (shift, shift, shift, shift), value=fill)
    dy, dx = (torch.randint(0, 2 * shift + 1, (N,), generator=g) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :]  # (N, 1, W)
    out = padded[torch.arange(N)[:, None, None], rows, cols]
    flip = torch.rand(N, generator=g) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


def expert_usage(decision: RoutingDecision, labels_N: Tensor, num_classes: int, soft: bool) -> Tensor:
    """(N classes, E) routed slots (Soft MoE: combine-weight mass) per class and expert."""
    ids_TK = decision.expert_ids_TK
    T, E = ids_TK.shape[0], decision.num_experts
    per_image = T // len(labels_N)
    if soft:
        mass_TE = decision.weights_TK.detach().float().reshape(T, E)
    else:
        mass_TE = torch.zeros(T, E)
        valid = ids_TK >= 0
        mass_TE.index_put_((torch.arange(T)[:, None].expand_as(ids_TK)[valid], ids_TK[valid]),
                           torch.ones(int(valid.sum())), accumulate=True)
    image_T = torch.arange(T) // per_image
    out = torch.zeros(num_classes, E)
    out.index_add_(0, labels_N[image_T], mass_TE)
    return out


def dropped_fraction(decision: RoutingDecision) -> tuple[int, int]:
    """(dropped slots, selected slots) of one decision."""
    selected = int((decision.selection_TK >= 0).sum())
    dropped = 0 if decision.dropped_TK is None else int(decision.dropped_TK.sum())
    return dropped, selected


@torch.no_grad()
def evaluate(model: ViT, split: Tensors, *, batch: int = 500, usage: bool = False) -> dict:
    """Accuracy, fraction of selected expert slots dropped for capacity, and (usage=True) each MoE
    layer's (classes x experts) usage, rows normalised to 1."""
    model.eval()
    correct, dropped, selected = 0, 0, 0
    layers = model.moe_layers()
    N = model.config.num_classes
    use = [torch.zeros(N, layer.config.num_experts) for layer in layers]
    for start in range(0, len(split.labels_N), batch):
        x, y = split.images_NHW[start:start + batch], split.labels_N[start:start + batch]
        out = model(x)
        correct += int((out.logits.argmax(-1) == y).sum())
        for i, (layer, d) in enumerate(zip(layers, out.routing)):
            a, b = dropped_fraction(d)
            dropped, selected = dropped + a, selected + b
            if usage:
                use[i] += expert_usage(d, y, N, soft=layer.config.router == "soft")
    result = {"accuracy": correct / len(split.labels_N),
              "dropped_fraction": dropped / selected if selected else 0.0}
    if usage:
        result["class_expert_usage"] = [(u / u.sum(1, keepdim=True).clamp_min(1e-9)).tolist() for u in use]
    return result


@contextlib.contextmanager
def capacity(model: ViT, capacity_factor: float | None, drop_policy: str) -> Iterator[None]:
    """Temporarily run every token-choice MoE layer with this capacity factor and drop policy."""
    saved = [(layer, layer.config) for layer in model.moe_layers()
             if layer.config.router not in ("expert_choice", "soft")]
    try:
        for layer, cfg in saved:
            layer.config = replace(cfg, capacity_factor=capacity_factor, expert_capacity=None,
                                   drop_policy=drop_policy)
        yield
    finally:
        for layer, cfg in saved:
            layer.config = cfg


@dataclass
class VisionResult:
    test_accuracy: float
    val_accuracy: float
    steps: int
    metrics_path: Path


def train_vision(model: ViT, data: ImageData, config: VisionTrainConfig, *, out_dir: str | Path,
                 progress: bool = True, label: str = "vision", run_info: dict | None = None) -> VisionResult:
    """Train `model` on `data`; writes metrics.jsonl, model.safetensors and run.json into out_dir."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if metrics_path.exists():
        raise ValueError(f"{out_dir} already holds a run (metrics.jsonl); choose a new --out "
                         f"(nothing was overwritten)")
    c = model.config
    if data.image_size != (c.image_size, c.image_size):
        raise ValueError(f"{data.source} holds {data.image_size[0]}x{data.image_size[1]} images but the "
                         f"model takes {c.image_size}x{c.image_size}; set --image-size")
    if data.num_classes > c.num_classes:
        raise ValueError(f"{data.source} has {data.num_classes} classes but the model has num_classes="
                         f"{c.num_classes}")
    train, val, test = to_tensors(data, config.val_images)
    optim = config.optim()
    optimizer = build_optimizer(model, optim)
    log = MetricsLog(metrics_path)
    bar = Progress(config.steps, label=label, enabled=progress, every=max(1, config.steps // 10))
    val_acc = float("nan")
    try:
        for step in range(config.steps):
            start = time.perf_counter()
            model.train()
            lr = lr_at(step, optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch_at(step, train, config)
            out = model(x)
            loss = F.cross_entropy(out.logits, y)
            optimizer.zero_grad(set_to_none=True)
            (loss + out.aux_loss).backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf")))
            if not np.isfinite(grad_norm) or not torch.isfinite(loss):
                raise ValueError(f"{label}: loss {loss.item()} / gradient norm {grad_norm} at step {step}; "
                                 f"lower --lr")
            optimizer.step()
            record = {"step": step + 1, "loss": loss.item(), "aux_loss": float(out.aux_loss.detach()), "lr": lr,
                      "grad_norm": grad_norm, "train_accuracy": float((out.logits.argmax(-1) == y).float().mean()),
                      "images_per_s": len(y) / max(time.perf_counter() - start, 1e-9),
                      "moe": [summarize_routing([d]) for d in out.routing]}
            last = step + 1 == config.steps
            if len(val) and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
                val_acc = evaluate(model, val, batch=config.eval_batch)["accuracy"]
                record["val_accuracy"] = val_acc
            if last:
                record["test_accuracy"] = evaluate(model, test, batch=config.eval_batch)["accuracy"]
            log.write(record)
            bar.update(step + 1, f"loss {record['loss']:.3f}" + (
                f" val acc {record['val_accuracy']:.3f}" if "val_accuracy" in record else ""))
    finally:
        bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out_dir / "model.safetensors"))
    (out_dir / "run.json").write_text(json.dumps({"model": c.to_dict(), "train": asdict(config),
                                                  "data": data.describe(), **(run_info or {})}, indent=1))
    return VisionResult(record["test_accuracy"], val_acc, config.steps, metrics_path)
