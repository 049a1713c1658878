"""The vision comparison report: summary.md / summary.json and PNG plots.

Plots: validation accuracy against steps; per MoE variant, each MoE layer's per-class expert
usage (which experts sandals and shirts go to); and V-MoE's capacity figure: test accuracy and
dropped fraction as the capacity factor shrinks, dropping by position vs batch prioritized routing.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from moekit.vision.data import FASHION_MNIST_CLASSES


def val_curve(metrics: list[dict]) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["val_accuracy"]) for r in metrics if "val_accuracy" in r]
    return [p[0] for p in points], [p[1] for p in points]


def steps_to_reach(metrics: list[dict], target: float) -> int | None:
    """First evaluated step whose validation accuracy is >= target (None if never)."""
    for step, acc in zip(*val_curve(metrics)):
        if acc >= target:
            return step
    return None


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    dense_final = val_curve(runs["dense"]["metrics"])[1][-1] if "dense" in runs else None
    out = {}
    for name, run in runs.items():
        m = run["metrics"]
        dropped = [sum(x["dropped_fraction"] for x in r["moe"]) / len(r["moe"]) for r in m if r.get("moe")]
        reach = steps_to_reach(m, dense_final) if dense_final is not None and name != "dense" else None
        out[name] = {
            "test_accuracy": m[-1]["test_accuracy"],
            "final_val_accuracy": val_curve(m)[1][-1] if val_curve(m)[1] else None,
            "steps": m[-1]["step"],
            "steps_to_dense_val_accuracy": reach,
            "train_dropped_fraction": statistics.fmean(dropped[-10:]) if dropped else None,
            "images_per_s": statistics.median(r["images_per_s"] for r in m),
            "total_params": run["total_params"],
            "active_params": run["active_params"],
            "flops_per_image": run["flops_per_image"],
            "description": run["description"],
            "capacity_sweep": run["sweep"],
        }
    return out


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(summary: dict[str, dict], *, config: dict, data: str) -> str:
    lines = ["# moekit compare --task vision", "", f"Data: {data}", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in config.items()), "",
             "| variant | test accuracy | val accuracy | steps to dense final val accuracy | dropped (train) "
             "| images/s | params | active params | MFLOP/image |", "|---|---|---|---|---|---|---|---|---|"]
    dense = summary.get("dense")
    for name, s in summary.items():
        reach = ("(baseline)" if name == "dense" else "-" if dense is None else
                 "not reached" if s["steps_to_dense_val_accuracy"] is None else
                 f"{s['steps_to_dense_val_accuracy']} of {dense['steps']}")
        lines.append(f"| {name} | {s['test_accuracy']:.4f} | {_f(s['final_val_accuracy'], '.4f')} | {reach} "
                     f"| {_f(s['train_dropped_fraction'], '.1%')} | {s['images_per_s']:,.0f} "
                     f"| {s['total_params']:,} | {s['active_params']:,} | {s['flops_per_image'] / 1e6:.2f} |")
    if dense is not None:
        lines += ["", "## Does the MoE beat its dense twin?", ""]
        for name, s in summary.items():
            if name != "dense":
                diff = s["test_accuracy"] - dense["test_accuracy"]
                lines.append(f"- {name}: test accuracy {s['test_accuracy']:.4f} vs dense "
                             f"{dense['test_accuracy']:.4f} ({diff:+.4f}): **{'yes' if diff > 0 else 'no'}**")
    sweeps = {n: s["capacity_sweep"] for n, s in summary.items() if s["capacity_sweep"]}
    for name, sweep in sweeps.items():
        lines += ["", f"## Capacity sweep at test time: {name}", "",
                  "| capacity factor | " + " | ".join(f"acc ({p}) | dropped ({p})" for p in sweep) + " |",
                  "|---|" + "---|---|" * len(sweep)]
        policies = list(sweep)
        for i, row in enumerate(sweep[policies[0]]):
            cells = " | ".join(f"{sweep[p][i]['accuracy']:.4f} | {sweep[p][i]['dropped_fraction']:.1%}"
                               for p in policies)
            lines.append(f"| {row['capacity_factor']} | {cells} |")
    lines += ["", "## Variants", ""] + [f"- {n}: {s['description']}" for n, s in summary.items()]
    lines += ["", "## Plots", "", "![validation accuracy](val_accuracy.png)", ""]
    lines += ["![capacity sweep](capacity_sweep.png)", ""] if sweeps else []
    lines += [f"![expert usage {n}](class_experts_{n}.png)" for n in summary if n != "dense"]
    return "\n".join(lines) + "\n"


def plot_val_accuracy(runs: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for name, run in runs.items():
        steps, acc = val_curve(run["metrics"])
        ax.plot(steps, acc, label=name, lw=2.2 if name == "dense" else 1.6, ls="--" if name == "dense" else "-")
    ax.set(xlabel="optimizer step", ylabel="validation accuracy", title="validation accuracy vs steps")
    tail = [a for r in runs.values() for a in val_curve(r["metrics"])[1][len(val_curve(r["metrics"])[1]) // 3:]]
    if tail:
        ax.set_ylim(min(tail) - 0.02, max(tail) + 0.01)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_class_experts(name: str, usage: list, path: Path, num_classes: int) -> None:
    """Per MoE layer: classes (rows) x experts (columns), each row the class's share per expert."""
    fig = Figure(figsize=(3.2 * len(usage) + 1.8, 3.6))
    axes = fig.subplots(1, len(usage), squeeze=False)[0]
    labels = FASHION_MNIST_CLASSES if num_classes == len(FASHION_MNIST_CLASSES) else [str(i) for i in range(num_classes)]
    for i, (ax, grid) in enumerate(zip(axes, usage)):
        grid_NE = np.asarray(grid)
        im = ax.imshow(grid_NE, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(grid_NE.max()), 1e-9))
        ax.set(title=f"MoE layer {i}", xlabel="expert")
        ax.set_yticks(range(num_classes))
        ax.set_yticklabels(labels if i == 0 else [], fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{name}: share of each class's routed patches per expert", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_capacity_sweep(sweeps: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    ax_a, ax_d = fig.subplots(1, 2)
    for name, sweep in sweeps.items():
        for policy, rows in sweep.items():
            f = [r["capacity_factor"] for r in rows]
            style = dict(marker="o", ls="-" if policy == "batch_priority" else "--",
                         label=f"{name}, {'BPR' if policy == 'batch_priority' else 'by position'}")
            ax_a.plot(f, [r["accuracy"] for r in rows], **style)
            ax_d.plot(f, [r["dropped_fraction"] for r in rows], **style)
    for ax, ylabel in ((ax_a, "test accuracy"), (ax_d, "dropped fraction of expert slots")):
        ax.set_xscale("log", base=2)
        ax.invert_xaxis()
        ax.set(xlabel="capacity factor at test time (shrinking ->)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_a.set_title("accuracy as capacity shrinks")
    ax_d.set_title("tokens dropped")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_vision_report(folder: str | Path, runs: dict[str, dict], *, config: dict, data: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    (folder / "summary.md").write_text(markdown(summary, config=config, data=data))
    payload = {"data": data, "config": config, "variants": summary,
               "class_expert_usage": {n: r["class_expert_usage"] for n, r in runs.items() if r["class_expert_usage"]}}
    (folder / "summary.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot_val_accuracy(runs, folder / "val_accuracy.png")
    sweeps = {n: r["sweep"] for n, r in runs.items() if r["sweep"]}
    if sweeps:
        plot_capacity_sweep(sweeps, folder / "capacity_sweep.png")
    for name, run in runs.items():
        if run["class_expert_usage"]:
            num_classes = len(run["class_expert_usage"][0])
            plot_class_experts(name, run["class_expert_usage"], folder / f"class_experts_{name}.png", num_classes)
    return folder
