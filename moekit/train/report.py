"""The comparison report: a Markdown summary table and matplotlib plots from each run's metrics.

Plots: validation loss against steps and against training FLOPs, MaxVio over time, and for each MoE
variant a heatmap of every layer's expert load over time (load / mean load, 1 = balanced).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

REACH_TARGET = 0.6  # an MoE should reach the dense final validation loss within 0.6x the dense steps
MAXVIO_TARGET = 0.2
TAIL = 10  # final MaxVio / dropped fraction: mean over the last TAIL steps (one batch is noisy)


def val_curve(metrics: list[dict]) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    return [p[0] for p in points], [p[1] for p in points]


def steps_to_reach(metrics: list[dict], target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None if never)."""
    for step, loss in zip(*val_curve(metrics)):
        if loss <= target:
            return step
    return None


def layer_mean(metrics: list[dict], key: str) -> list[float]:
    """Per step, `key` of the MoE layers averaged over layers."""
    return [sum(m[key] for m in r["moe"]) / len(r["moe"]) for r in metrics if r.get("moe")]


def final_val_max_vio(metrics: list[dict]) -> float | None:
    """MaxVio over the validation set at the last evaluation, averaged over MoE layers."""
    evals = [r["val_moe"] for r in metrics if r.get("val_moe")]
    return sum(x["max_vio"] for x in evals[-1]) / len(evals[-1]) if evals else None


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    dense_final = None
    if "dense" in runs:
        dense_final = val_curve(runs["dense"]["metrics"])[1][-1]
    dense_steps = runs["dense"]["metrics"][-1]["step"] if "dense" in runs else None
    out = {}
    for name, run in runs.items():
        m = run["metrics"]
        steps, vals = val_curve(m)
        maxvio, dropped = layer_mean(m, "max_vio"), layer_mean(m, "dropped_fraction")
        reach = steps_to_reach(m, dense_final) if dense_final is not None and name != "dense" else None
        out[name] = {
            "final_val_loss": vals[-1] if vals else None,
            "steps": m[-1]["step"],
            "steps_to_dense": reach,
            "reach_ratio": reach / dense_steps if reach is not None and dense_steps else None,
            "max_vio": statistics.fmean(maxvio[-TAIL:]) if maxvio else None,
            "val_max_vio": final_val_max_vio(m),
            "dropped_fraction": statistics.fmean(dropped[-TAIL:]) if dropped else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in m),
            "total_params": run["total_params"],
            "active_params": run["active_params"],
            "description": run["description"],
            "balanced": run["balanced"],
        }
    return out


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(summary: dict[str, dict], *, config: dict, corpus: str) -> str:
    dense = summary.get("dense")
    lines = ["# moekit compare", "", f"Corpus: {corpus}", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in config.items()), "",
             "| variant | final val loss | steps to dense final val loss | MaxVio (val set) "
             "| MaxVio (train batch) | dropped | tokens/s | total params | active params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        reach = ("(baseline)" if name == "dense" else
                 "not reached" if s["steps_to_dense"] is None or dense is None else
                 f"{s['steps_to_dense']} ({s['reach_ratio']:.2f}x)")
        lines.append(f"| {name} | {_fmt(s['final_val_loss'], '.4f')} | {reach} | {_fmt(s['val_max_vio'], '.3f')} "
                     f"| {_fmt(s['max_vio'], '.3f')} "
                     f"| {_fmt(s['dropped_fraction'], '.1%')} | {s['tokens_per_s']:,.0f} "
                     f"| {s['total_params']:,} | {s['active_params']:,} |")
    lines += ["", "MaxVio = max expert load / mean load - 1 (Wang et al. 2024; 0 is perfect balance), averaged "
              "over MoE layers: on the whole validation set at the end (MaxVio_global), and on each "
              f"training batch averaged over the last {TAIL} steps (MaxVio_batch, which includes the "
              f"sampling noise of one batch). Dropped fraction: also over the last {TAIL} steps.", "",
              "## Targets", ""]
    if dense is None:
        lines.append("No dense baseline in this comparison: add `dense` to --variants for the targets.")
    else:
        for name, s in summary.items():
            if name == "dense" or not s["balanced"]:
                continue
            fast = s["reach_ratio"] is not None and s["reach_ratio"] <= REACH_TARGET
            lower = s["final_val_loss"] is not None and s["final_val_loss"] < dense["final_val_loss"]
            ratio = "never" if s["reach_ratio"] is None else f"at {s['reach_ratio']:.2f}x the dense steps"
            lines.append(f"- {name}: reaches the dense final val loss {ratio} (target <= {REACH_TARGET}x): "
                         f"**{'met' if fast else 'missed'}**; ends "
                         f"{'lower' if lower else 'not lower'} than dense "
                         f"({_fmt(s['final_val_loss'], '.4f')} vs {dense['final_val_loss']:.4f}): "
                         f"**{'met' if lower else 'missed'}**")
    if "aux_free" in summary and summary["aux_free"]["max_vio"] is not None:
        for label, key in (("validation set", "val_max_vio"), ("train batch", "max_vio")):
            v = summary["aux_free"][key]
            if v is not None:
                lines.append(f"- aux_free final MaxVio ({label}) {v:.3f} (target < {MAXVIO_TARGET}): "
                             f"**{'met' if v < MAXVIO_TARGET else 'missed'}**")
    lines += ["", "## Variants", ""] + [f"- {n}: {s['description']}" for n, s in summary.items()]
    lines += ["", "## Plots", "", "![validation loss](val_loss.png)", "", "![MaxVio](max_vio.png)", ""]
    lines += [f"![expert load {n}](expert_load_{n}.png)" for n, s in summary.items() if s["max_vio"] is not None]
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return v
    kernel = np.ones(window) / window
    head = np.cumsum(v[: window - 1]) / np.arange(1, window)  # partial windows at the start
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def plot_val_loss(runs: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(12, 4.5))
    ax_s, ax_f = fig.subplots(1, 2)
    for name, run in runs.items():
        steps, vals = val_curve(run["metrics"])
        tokens_per_step = run["metrics"][0]["tokens"]  # step 1 has seen one step of tokens
        flops = [s * tokens_per_step * run["flops_per_token"] for s in steps]
        style = dict(lw=2.2 if name == "dense" else 1.6, ls="--" if name == "dense" else "-", label=name)
        ax_s.plot(steps, vals, **style)
        ax_f.plot(flops, vals, **style)
    if "dense" in runs:
        final = val_curve(runs["dense"]["metrics"])[1][-1]
        for ax in (ax_s, ax_f):
            ax.axhline(final, color="grey", lw=0.8, ls=":")
    ax_s.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title="validation loss vs steps")
    ax_f.set(xlabel="training FLOPs (6N_active + 6LSD per token)", ylabel="validation loss",
             title="validation loss vs training compute")
    for ax in (ax_s, ax_f):
        ax.grid(alpha=0.3)
        ax.legend()
        lo = min(min(val_curve(r["metrics"])[1]) for r in runs.values())
        ax.set_ylim(lo - 0.1, lo + 2.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_max_vio(runs: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, run in runs.items():
        values = layer_mean(run["metrics"], "max_vio")
        if values:
            steps = [r["step"] for r in run["metrics"] if r.get("moe")]
            ax.plot(steps, _smooth(values), label=name)
    ax.axhline(MAXVIO_TARGET, color="grey", lw=0.8, ls=":", label=f"{MAXVIO_TARGET} target")
    # Early steps can reach MaxVio ~E (all tokens on one expert); cap the axis to keep the end readable.
    ax.set(xlabel="optimizer step", ylabel="MaxVio (mean over layers, 10-step average)",
           title="load imbalance over training (axis capped at 2)", ylim=(0, 2))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_expert_load(name: str, metrics: list[dict], path: Path, columns: int = 60) -> None:
    """Heatmap per layer: expert (rows) x training time (columns), load / mean load."""
    records = [r for r in metrics if r.get("moe")]
    n_layers = len(records[0]["moe"])
    fig = Figure(figsize=(9, 1.2 + 1.3 * n_layers))
    axes = fig.subplots(n_layers, 1, squeeze=False, sharex=True)
    chunks = np.array_split(np.arange(len(records)), min(columns, len(records)))
    for layer, ax in enumerate(axes[:, 0]):
        counts_TE = np.array([records[i]["moe"][layer]["tokens_per_expert"] for i in range(len(records))],
                             dtype=float)
        load_TE = counts_TE / np.maximum(counts_TE.mean(1, keepdims=True), 1e-9)
        grid_EC = np.stack([load_TE[c].mean(0) for c in chunks], axis=1)
        extent = (records[0]["step"], records[-1]["step"], grid_EC.shape[0] - 0.5, -0.5)
        im = ax.imshow(grid_EC, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2, extent=extent,
                       interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{name}: expert load / mean load (1 = balanced)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.9)
    fig.savefig(path, dpi=110)


def write_report(folder: str | Path, runs: dict[str, dict], *, config: dict, corpus: str) -> Path:
    """Write summary.md, summary.json and the PNG plots into `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    (folder / "summary.md").write_text(markdown(summary, config=config, corpus=corpus))
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_val_loss(runs, folder / "val_loss.png")
    plot_max_vio(runs, folder / "max_vio.png")
    for name, run in runs.items():
        if any(r.get("moe") for r in run["metrics"]):
            plot_expert_load(name, run["metrics"], folder / f"expert_load_{name}.png")
    return folder
