"""`moekit compare --task multitask`: the models of Ma et al. 2018 on income and never-married.

Models: single-task networks (one shared-bottom net per task), shared-bottom, one-gate MoE (OMoE)
and multi-gate MoE (MMoE), each trained over several seeds with identical data and batches. The
shared bottom is as wide as all experts together (E * expert_dim), so the baselines hold a
comparable number of parameters. Writes summary.json (AUC per task and model: mean, std, per
seed), summary.md and gate_weights.png (mean gate weight per expert for each task). Rerunning
the same command reads back the finished runs and trains only the missing ones.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from moekit.config import check
from moekit.multitask.data import TASKS, TabularData
from moekit.multitask.model import MultiTaskConfig
from moekit.multitask.train import MultiTaskTrainConfig, build_model, train_multitask
from moekit.train.metrics import read_metrics

MODELS = {
    "single": "one shared-bottom network per task, each trained on its own task only",
    "shared_bottom": "one bottom MLP (width E * expert_dim) shared by both towers",
    "one_gate": "E experts, one softmax gate shared by both tasks (OMoE)",
    "mmoe": "E experts, one softmax gate per task (MMoE)",
}
DEFAULT_MODELS = tuple(MODELS)


@dataclass(frozen=True, kw_only=True)
class MultiTaskCompareConfig:
    """Shape and budget of the multi-task comparison (defaults: a few minutes on one CPU thread)."""

    embed_dim: int = 4
    num_experts: int = 8
    expert_dim: int = 16
    tower_dim: int = 8
    gate_top_k: int = 0  # 0: dense softmax gates; k: top-k gates
    steps: int = 400  # about 2 epochs of 1024 rows
    batch_size: int = 1024
    lr: float = 1e-3
    seeds: int = 3
    seed: int = 0
    instance_weights: bool = False

    def __post_init__(self) -> None:
        check(isinstance(self.seeds, int) and self.seeds >= 1, "seeds", self.seeds, "must be >= 1")
        check(self.gate_top_k >= 0, "gate_top_k", self.gate_top_k, "must be 0 (dense) or a top-k")

    def model(self, kind: str, data: TabularData, num_tasks: int = 2) -> MultiTaskConfig:
        return MultiTaskConfig(kind=kind, cardinalities=data.cardinalities,  # type: ignore[arg-type]
                               num_numeric=data.train.numeric_NF.shape[1], embed_dim=self.embed_dim,
                               num_tasks=num_tasks, num_experts=self.num_experts, expert_dim=self.expert_dim,
                               gate_top_k=self.gate_top_k or None, tower_dim=self.tower_dim)

    def train_config(self, seed: int) -> MultiTaskTrainConfig:
        return MultiTaskTrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                                    instance_weights=self.instance_weights, seed=seed)


def check_models(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown multitask model(s) {unknown}; choose from {sorted(MODELS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"models {names} repeat a name; list each once")
    return names


def finished(run: Path | None, config: MultiTaskCompareConfig) -> dict | None:
    """The result of a finished run in `run` with these settings, else None (an unfinished run's
    metrics are removed so that it restarts)."""
    if run is None or not (run / "run.json").is_file():
        if run is not None and (run / "metrics.jsonl").is_file():
            (run / "metrics.jsonl").unlink()
        return None
    saved = json.loads((run / "run.json").read_text())
    if saved["train"]["steps"] != config.steps or saved["model"]["num_experts"] != config.num_experts:
        raise ValueError(f"{run} was trained with other settings ({saved['train']}); choose a new --out")
    last = read_metrics(run / "metrics.jsonl")[-1]
    return {"auc": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("test_auc/")},
            "gate_means": last["gate_means"]}


def train_one(name: str, config: MultiTaskCompareConfig, data: TabularData, seed: int,
              out_dir: Path | None) -> dict:
    """AUC per task (and gate means) of model `name` trained with `seed` (a finished run in
    out_dir is read back instead of retrained)."""
    if name == "single":
        auc = {}
        for t, task in enumerate(TASKS):
            run = None if out_dir is None else out_dir / task
            result = finished(run, config)
            if result is None:
                model = build_model(config.model("shared_bottom", data, num_tasks=1), seed)
                result = train_multitask(model, data, config.train_config(seed), tasks=(t,), out_dir=run)
            auc.update(result["auc"])
        return {"auc": auc, "gate_means": []}
    result = finished(out_dir, config)
    if result is None:
        model = build_model(config.model(name, data), seed)
        result = train_multitask(model, data, config.train_config(seed), out_dir=out_dir)
    return result


def run_multitask_compare(config: MultiTaskCompareConfig, data: TabularData, *, models: list[str],
                          out_dir: str | Path, progress: bool = True) -> Path:
    check_models(models)
    out_dir = Path(out_dir)
    results: dict[str, list[dict]] = {name: [] for name in models}
    for s in range(config.seeds):
        seed = config.seed + s
        for name in models:
            r = train_one(name, config, data, seed, out_dir / "runs" / f"{name}-seed{seed}")
            results[name].append(r)
            if progress:
                print(f"seed {seed} {name:>14}: " + ", ".join(f"AUC {k} {v:.4f}" for k, v in r["auc"].items()),
                      flush=True)
    return write_report(out_dir / "report", results, config=config, data=data.describe())


def summarize(results: dict[str, list[dict]]) -> dict:
    out = {}
    for name, runs in results.items():
        auc = {}
        for task in TASKS:
            values = [r["auc"][task] for r in runs]
            auc[task] = {"mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": values}
        # Expert ids mean nothing across seeds, so the picture shows the first seed's gates.
        gates = [r["gate_means"] for r in runs if r["gate_means"]]
        out[name] = {"description": MODELS[name], "auc": auc, "gate_means": gates[0] if gates else None,
                     "gate_means_per_seed": gates}
    return out


def markdown(summary: dict, *, config: MultiTaskCompareConfig, data: str) -> str:
    lines = ["# moekit compare --task multitask", "", f"Data: {data}", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()), "",
             f"Test ROC AUC, mean ± std over {config.seeds} seed(s):", "",
             "| model | " + " | ".join(f"AUC {t}" for t in TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for name, s in summary.items():
        cells = " | ".join(f"{s['auc'][t]['mean']:.4f} ± {s['auc'][t]['std']:.4f}" for t in TASKS)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "## Models", ""] + [f"- {n}: {s['description']}" for n, s in summary.items()]
    if any(s["gate_means"] for s in summary.values()):
        lines += ["", "![gate weights](gate_weights.png)"]
    return "\n".join(lines) + "\n"


def plot_gates(summary: dict, path: Path) -> None:
    """Mean gate weight of each expert, one row per (model, task) gate."""
    rows, labels = [], []
    for name, s in summary.items():
        if not s["gate_means"]:
            continue
        gates = s["gate_means"]
        for i, g in enumerate(gates):
            rows.append(g)
            labels.append(f"{name}: {TASKS[i] if len(gates) > 1 else 'both tasks'}")
    grid = np.asarray(rows)
    fig = Figure(figsize=(1.2 + 0.55 * grid.shape[1], 1.0 + 0.5 * len(rows)))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="magma", vmin=0, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < grid.max() * 0.6 else "black")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title("mean gate weight per expert on the test set (first seed)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(folder: Path, results: dict[str, list[dict]], *, config: MultiTaskCompareConfig,
                 data: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    (folder / "summary.md").write_text(markdown(summary, config=config, data=data))
    (folder / "summary.json").write_text(json.dumps({"data": data, "config": asdict(config),
                                                     "tasks": list(TASKS), "models": summary}, indent=1) + "\n")
    if any(s["gate_means"] for s in summary.values()):
        plot_gates(summary, folder / "gate_weights.png")
    return folder

