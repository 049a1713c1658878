"""Train and evaluate multi-task models on encoded tabular data; ROC AUC per task.

Loss: the sum over trained tasks of binary cross-entropy (optionally weighted by the rows'
instance weights, normalised to mean 1 in each batch). Adam with a constant learning rate;
batches are a pure function of (seed, step). The test AUC of each task is written to the run's
`metrics.jsonl` as `test_auc/<task>`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.config import check
from moekit.multitask.data import TASKS, TabularData, TabularSplit
from moekit.multitask.model import MultiTaskConfig, MultiTaskModel
from moekit.train.metrics import MetricsLog, Progress


def roc_auc(scores_N: np.ndarray, labels_N: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties
    counting 1/2 (the Mann-Whitney U statistic over P * N pairs, with average ranks for ties)."""
    scores_N, labels_N = np.asarray(scores_N, dtype=np.float64), np.asarray(labels_N)
    if scores_N.shape != labels_N.shape or scores_N.ndim != 1:
        raise ValueError(f"scores {scores_N.shape} and labels {labels_N.shape} must be equal 1-D shapes")
    positive = labels_N.astype(bool)
    P, N = int(positive.sum()), int((~positive).sum())
    if P == 0 or N == 0:
        raise ValueError(f"AUC needs both classes; got {P} positive and {N} negative rows")
    _, inverse, counts = np.unique(scores_N, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based rank of each distinct score, ties averaged
    rank_sum = float(average_rank[inverse][positive].sum())
    return (rank_sum - P * (P + 1) / 2.0) / (P * N)


@dataclass(frozen=True, kw_only=True)
class MultiTaskTrainConfig:
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 1e-3
    instance_weights: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        check(self.lr > 0, "lr", self.lr, "must be > 0")


def split_tensors(split: TabularSplit) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (torch.from_numpy(split.categorical_NC), torch.from_numpy(split.numeric_NF),
            torch.from_numpy(split.labels_NT), torch.from_numpy(split.weight_N))


@torch.no_grad()
def predict(model: MultiTaskModel, split: TabularSplit, batch: int = 8192) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities (N, T) and each gate's weights (N, E) on a split."""
    model.eval()
    cat, num, _, _ = split_tensors(split)
    probs, gates = [], []
    for start in range(0, len(cat), batch):
        out = model(cat[start:start + batch], num[start:start + batch])
        probs.append(torch.sigmoid(out.logits_NT.float()))
        gates.append([g.float() for g in out.gates])
    gate_arrays = [torch.cat([g[i] for g in gates]).numpy() for i in range(len(gates[0]))]
    return torch.cat(probs).numpy(), gate_arrays


def evaluate(model: MultiTaskModel, split: TabularSplit, tasks: tuple[int, ...]) -> dict:
    """{"auc": {task name: AUC}, "gate_means": per gate the mean weight of each expert}."""
    probs_NT, gates = predict(model, split)
    auc = {TASKS[t]: roc_auc(probs_NT[:, i], split.labels_NT[:, t]) for i, t in enumerate(tasks)}
    return {"auc": auc, "gate_means": [g.mean(0).tolist() for g in gates]}


def build_model(config: MultiTaskConfig, seed: int) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(config)


def train_multitask(model: MultiTaskModel, data: TabularData, config: MultiTaskTrainConfig, *,
                    tasks: tuple[int, ...] = (0, 1), out_dir: str | Path | None = None,
                    progress: bool = False, label: str = "multitask") -> dict:
    """Train `model` (one tower per entry of `tasks`, indices into TASKS) and return the test
    evaluation. With out_dir: metrics.jsonl (a new folder only), run.json, model.safetensors."""
    if model.config.num_tasks != len(tasks):
        raise ValueError(f"the model has {model.config.num_tasks} towers but {len(tasks)} tasks were asked for")
    log = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        if (out_dir / "metrics.jsonl").exists():
            raise ValueError(f"{out_dir} already holds a run (metrics.jsonl); choose a new --out "
                             f"(nothing was overwritten)")
        log = MetricsLog(out_dir / "metrics.jsonl")
    cat, num, labels, weight = split_tensors(data.train)
    labels = labels[:, list(tasks)]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    n, B = len(cat), min(config.batch_size, len(cat))
    per_epoch = max(n // B, 1)
    bar = Progress(config.steps, label=label, enabled=progress, every=max(1, config.steps // 5))
    try:
        for step in range(config.steps):
            start = time.perf_counter()
            epoch, offset = divmod(step, per_epoch)
            if offset == 0:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
            idx = order[offset * B: offset * B + B]
            model.train()
            out = model(cat[idx], num[idx])
            w = weight[idx] / weight[idx].mean() if config.instance_weights else None
            per_task = [F.binary_cross_entropy_with_logits(out.logits_NT[:, i], labels[idx, i], weight=w)
                        for i in range(len(tasks))]
            loss = sum(per_task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if log is not None:
                log.write({"step": step + 1, "loss": float(loss.detach()),
                           **{f"loss/{TASKS[t]}": float(v.detach()) for t, v in zip(tasks, per_task)},
                           "rows_per_s": len(idx) / max(time.perf_counter() - start, 1e-9)})
            bar.update(step + 1, f"loss {float(loss.detach()):.4f}")
    finally:
        bar.close()
    result = evaluate(model, data.test, tasks)
    if log is not None and out_dir is not None:
        log.write({"step": config.steps, **{f"test_auc/{k}": v for k, v in result["auc"].items()},
                   "gate_means": result["gate_means"]})
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(out_dir / "model.safetensors"))
        (out_dir / "run.json").write_text(json.dumps(
            {"model": asdict(model.config), "train": asdict(config), "tasks": [TASKS[t] for t in tasks],
             "data": data.describe()}, indent=1))
    return result
