"""The comparison report: a Markdown summary table and matplotlib plots from each run's metrics.

Every figure is per variant over its seeds (mean, and the spread when there are several): the
final validation loss, the step at which it reaches the dense model's final validation loss
(interpolated between evaluations, against the dense run of the same seed), MaxVio on training
batches and on held-out text (with the worst layer where it stands out), and throughput; the
final validation loss on the whole held-out set too where the run evaluated its last step on it.
Plots: validation loss against steps and against training FLOPs, MaxVio over time (training
batches and validation set), and for each MoE variant a heatmap of every layer's expert load.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

from moekit.train.curves import (
    Spread,
    final_full_val_loss,
    final_val_max_vio_layers,
    layer_mean,
    separated,
    spread,
    steps_to_reach,
    val_curve,
)
from moekit.train.plots import clip_loss_axes, colours, dense_line, loss_panels, smooth

REACH_TARGET = 0.5  # an MoE should reach the dense final validation loss within 0.5x the dense steps
MAXVIO_TARGET = 0.2
TAIL = 10  # final MaxVio / dropped fraction: mean over the last TAIL steps (one batch is noisy)
# A layer's validation MaxVio is shown beside the layer average when it is this much worse.
WORST_LAYER_MARGIN = 0.1


def _seed_summary(m: list[dict], *, dense_final: float | None, dense_steps: int | None) -> dict:
    vals = val_curve(m)[1]
    maxvio, dropped = layer_mean(m, "max_vio"), layer_mean(m, "dropped_fraction")
    reach = steps_to_reach(m, dense_final) if dense_final is not None else None
    layers = final_val_max_vio_layers(m)
    cpu = [r["tokens_per_cpu_s"] for r in m if "tokens_per_cpu_s" in r]
    return {
        "final_val_loss": vals[-1] if vals else None,
        "full_val_loss": final_full_val_loss(m),
        "steps": m[-1]["step"],
        "steps_to_dense": reach,
        "reach_ratio": reach / dense_steps if reach is not None and dense_steps else None,
        "max_vio": statistics.fmean(maxvio[-TAIL:]) if maxvio else None,
        "val_max_vio": statistics.fmean(layers) if layers else None,
        "val_max_vio_layers": layers,
        "dropped_fraction": statistics.fmean(dropped[-TAIL:]) if dropped else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in m),
        "tokens_per_cpu_s": statistics.median(cpu) if cpu else None,
    }


def _spread_of(per_seed: dict[int, dict], key: str) -> Spread | None:
    return spread([s[key] for s in per_seed.values() if s[key] is not None])


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    """Per variant: each seed's figures (`per_seed`), their means, and `spread` (mean, std, range, n)."""
    dense = runs.get("dense")
    dense_final = {seed: val_curve(m)[1][-1] for seed, m in dense["metrics"].items()} if dense else {}
    dense_steps = {seed: m[-1]["step"] for seed, m in dense["metrics"].items()} if dense else {}
    fallback = statistics.fmean(dense_final.values()) if dense_final else None
    out = {}
    for name, run in runs.items():
        per_seed = {}
        for seed, m in run["metrics"].items():
            baseline = name != "dense" and dense is not None
            per_seed[seed] = _seed_summary(
                m, dense_final=dense_final.get(seed, fallback) if baseline else None,
                dense_steps=dense_steps.get(seed, m[-1]["step"]) if baseline else None)
        keys = ("final_val_loss", "full_val_loss", "steps_to_dense", "reach_ratio", "max_vio", "val_max_vio",
                "dropped_fraction")
        spreads = {k: _spread_of(per_seed, k) for k in keys}
        layer_lists = [s["val_max_vio_layers"] for s in per_seed.values() if s["val_max_vio_layers"]]
        cpu = [s["tokens_per_cpu_s"] for s in per_seed.values() if s["tokens_per_cpu_s"] is not None]
        out[name] = {
            **{k: (v.mean if v is not None else None) for k, v in spreads.items()},
            "spread": {k: (asdict(v) if v is not None else None) for k, v in spreads.items()},
            "seeds": len(per_seed),
            "reached_seeds": sum(s["steps_to_dense"] is not None for s in per_seed.values()),
            "steps": max(s["steps"] for s in per_seed.values()),
            "val_max_vio_layers": [statistics.fmean(c) for c in zip(*layer_lists)] if layer_lists else None,
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in per_seed.values()),
            "tokens_per_cpu_s": statistics.median(cpu) if cpu else None,
            "total_params": run["total_params"],
            "active_params": run["active_params"],
            "flops_per_token": run["flops_per_token"],
            "description": run["description"],
            "balanced": run["balanced"],
            "per_seed": {str(seed): s for seed, s in per_seed.items()},
        }
    if dense is not None:
        for name, s in out.items():
            if name != "dense":
                s["vs_dense"] = {key: _versus(s, out["dense"], key) for key in VERSUS_KEYS}
    return out


# the figures an MoE variant is compared with the dense model on, over seeds
VERSUS_KEYS = ("final_val_loss", "full_val_loss")


def _versus(s: dict, dense: dict, key: str) -> dict | None:
    """`key` of variant `s` minus the dense model's: the difference of the means, the spread of the
    per-seed differences (each seed against the dense run of the same seed, where both have it),
    and whether the two seed ranges are separated (None with fewer than two seeds each)."""
    ours, base = _sp(s, key), _sp(dense, key)
    if ours is None or base is None:
        return None
    paired = spread([v[key] - dense["per_seed"][seed][key] for seed, v in s["per_seed"].items()
                     if v[key] is not None and seed in dense["per_seed"]
                     and dense["per_seed"][seed][key] is not None])
    return {"difference": ours.mean - base.mean, "per_seed": asdict(paired) if paired is not None else None,
            "beyond_spread": separated(ours, base)}


def _versus_line(name: str, s: dict) -> str:
    parts = []
    for key, what in zip(VERSUS_KEYS, ("final val loss", "on the whole held-out set")):
        v = s["vs_dense"].get(key)
        if v is None:
            continue
        verdict = {True: "beyond the seed spread", False: "within the seed spread",
                   None: "spread unknown (one seed)"}[v["beyond_spread"]]
        per_seed = Spread(**v["per_seed"]) if v["per_seed"] else None
        paired = (f", per seed {per_seed.mean:+.4f} ± {per_seed.std:.4f}"
                  if per_seed is not None and per_seed.n > 1 else "")
        parts.append(f"{what} {v['difference']:+.4f}{paired}: {verdict}")
    return f"- {name} - dense: " + "; ".join(parts) if parts else f"- {name} - dense: -"


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _sp(s: dict, key: str) -> Spread | None:
    d = s["spread"].get(key)
    return Spread(**d) if d is not None else None


def _text(s: dict, key: str, spec: str) -> str:
    v = _sp(s, key)
    return "-" if v is None else v.text(spec)


def _val_max_vio_text(s: dict) -> str:
    """The layer average, and the worst layer when it is WORST_LAYER_MARGIN above the average."""
    text = _text(s, "val_max_vio", ".3f")
    layers = s["val_max_vio_layers"]
    if layers and s["val_max_vio"] is not None:
        worst = int(np.argmax(layers))
        if layers[worst] - s["val_max_vio"] >= WORST_LAYER_MARGIN - 1e-9:
            text += f" (layer {worst}: {layers[worst]:.3f})"
    return text


def _reach_text(name: str, s: dict, dense: dict | None) -> str:
    if name == "dense":
        return "(baseline)"
    if dense is None or s["reached_seeds"] == 0:
        return "not reached"
    ratio = _sp(s, "reach_ratio")
    steps = _sp(s, "steps_to_dense")
    assert ratio is not None and steps is not None
    text = f"{steps.mean:.0f} ({ratio.text('.2f', 'x')})"
    if s["reached_seeds"] < s["seeds"]:
        text += f", reached by {s['reached_seeds']} of {s['seeds']} seeds (mean over those)"
    return text


def _throughput(s: dict, dense: dict | None) -> str:
    cpu = s["tokens_per_cpu_s"]
    if cpu is None:
        return "-"
    base = dense.get("tokens_per_cpu_s") if dense else None
    rel = f" ({cpu / base:.2f}x dense)" if base else ""
    return f"{cpu:,.0f}{rel}"


def markdown(summary: dict[str, dict], *, config: dict, corpus: str, validation: str = "") -> str:
    dense = summary.get("dense")
    lines = ["# moekit compare", "", f"Corpus: {corpus}", ""]
    if validation:
        lines += [f"Validation loss and validation MaxVio: {validation}.", ""]
    # the whole held-out set's final loss, where every variant has one (runs since it was recorded)
    whole = all(s["spread"].get("full_val_loss") for s in summary.values())
    lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in config.items()), "",
              "| variant | final val loss | " + ("final val loss (whole held-out set) | " if whole else "")
              + "steps to dense final val loss | MaxVio (held-out) "
              "| MaxVio (train batch) | dropped | tokens per CPU-s | tokens/s (wall, load-dependent) "
              "| total params | active params |",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if whole else "")]
    for name, s in summary.items():
        full = f"{_text(s, 'full_val_loss', '.4f')} | " if whole else ""
        lines.append(f"| {name} | {_text(s, 'final_val_loss', '.4f')} | {full}{_reach_text(name, s, dense)} "
                     f"| {_val_max_vio_text(s)} | {_text(s, 'max_vio', '.3f')} "
                     f"| {_fmt(s['dropped_fraction'], '.1%')} | {_throughput(s, dense)} "
                     f"| {s['tokens_per_s']:,.0f} | {s['total_params']:,} | {s['active_params']:,} |")
    lines += ["", "With several seeds each figure is the mean ± the sample standard deviation over seeds; "
              "each seed's crossing is measured against the dense run of the same seed, interpolated "
              "linearly between the two evaluations around it. Final val loss and the crossings are "
              "measured on the validation sequences every evaluation uses"
              + ("; the final step is also evaluated on the whole held-out set." if whole else "."),
              "", "MaxVio = max expert load / mean load - 1 (Wang et al. 2024; 0 is perfect balance), averaged "
              "over MoE layers (a layer at least "
              f"{WORST_LAYER_MARGIN} above that average is named beside it): on held-out text at the end "
              "(the whole held-out set where the final step was evaluated on it, else the last "
              "evaluation's sequences; MaxVio_global), and on each "
              f"training batch averaged over the last {TAIL} steps (MaxVio_batch, which includes the "
              f"sampling noise of one batch). Dropped fraction: also over the last {TAIL} steps.", "",
              "Throughput: tokens per second of the training process's CPU time (median over steps), "
              "which other processes' load changes much less than wall time, so variants trained at "
              "different times compare; wall-clock tokens/s follows the machine's load.", ""]
    versus = [_versus_line(n, s) for n, s in summary.items() if "vs_dense" in s]
    if versus:
        lines += ["## Against dense", "", "Difference of the means from the dense model; per seed: mean ± std "
                  "of each seed's difference from the dense run of the same seed; beyond the seed spread "
                  "when the two seed ranges do not overlap.", "", *versus, ""]
    lines += ["## Targets", ""]
    if dense is None:
        lines.append("No dense baseline in this comparison: add `dense` to --variants for the targets.")
    else:
        lines += [_target_line(name, s, dense) for name, s in summary.items()
                  if name != "dense" and s["balanced"]]
    if "aux_free" in summary and summary["aux_free"]["max_vio"] is not None:
        for label, key in (("held-out", "val_max_vio"), ("train batch", "max_vio")):
            v = summary["aux_free"][key]
            if v is not None:
                lines.append(f"- aux_free final MaxVio ({label}) {_text(summary['aux_free'], key, '.3f')} "
                             f"(target < {MAXVIO_TARGET}): **{'met' if v < MAXVIO_TARGET else 'missed'}**")
    lines += ["", "## Variants", ""] + [f"- {n}: {s['description']}" for n, s in summary.items()]
    lines += ["", "## Plots", "", "![validation loss](val_loss.png)", "", "![MaxVio](max_vio.png)", ""]
    lines += [f"![expert load {n}](expert_load_{n}.png)" for n, s in summary.items()
              if s["max_vio"] is not None]
    return "\n".join(lines) + "\n"


def _target_line(name: str, s: dict, dense: dict) -> str:
    fast = (s["reach_ratio"] is not None and s["reached_seeds"] == s["seeds"]
            and s["reach_ratio"] <= REACH_TARGET)
    # "ends lower" on the whole held-out set where both have its figure, else on the evaluation sample
    key = "full_val_loss" if s.get("full_val_loss") is not None and dense.get("full_val_loss") is not None \
        else "final_val_loss"
    lower = s[key] is not None and s[key] < dense[key]
    if s["reached_seeds"] == 0:
        reach = f"does not reach the dense final val loss within its {s['steps']} steps"
    else:
        reach = f"reaches the dense final val loss at {_sp(s, 'reach_ratio').text('.2f', 'x')} the dense steps"
        if s["reached_seeds"] < s["seeds"]:
            reach += f" (only {s['reached_seeds']} of {s['seeds']} seeds)"
    return (f"- {name}: {reach} (target <= {REACH_TARGET}x): **{'met' if fast else 'missed'}**; ends "
            f"{'lower' if lower else 'not lower'} than dense ({_text(s, key, '.4f')} vs "
            f"{dense[key]:.4f}{', whole held-out set' if key == 'full_val_loss' else ''}): "
            f"**{'met' if lower else 'missed'}**")


def plot_val_loss(runs: dict[str, dict], path: Path, colour: dict[str, str]) -> None:
    fig = Figure(figsize=(12, 4.5))
    ax_s, ax_f = fig.subplots(1, 2)
    def label(name: str, run: dict) -> str:
        seeds = len(run["metrics"])
        return name if seeds == 1 else f"{name} (mean of {seeds} seeds)"

    ranges = loss_panels(ax_s, ax_f, runs, colour, label)
    if "dense" in runs:
        final = statistics.fmean(val_curve(m)[1][-1] for m in runs["dense"]["metrics"].values())
        for ax in (ax_s, ax_f):
            dense_line(ax, final)
    ax_s.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title="validation loss vs steps")
    ax_f.set(xlabel="training FLOPs (6N_active incl. router + 6LSD per token)", ylabel="validation loss",
             title="validation loss vs training compute")
    for ax in (ax_s, ax_f):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    clip_loss_axes((ax_s, ax_f), ranges)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_max_vio(runs: dict[str, dict], path: Path, colour: dict[str, str]) -> None:
    """Training-batch MaxVio (10-step average, solid) and validation-set MaxVio at each evaluation
    (dots, dashed), layer mean, of each variant's first seed."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for name, run in runs.items():
        metrics = next(iter(run["metrics"].values()))
        values = layer_mean(metrics, "max_vio")
        if not values:
            continue
        steps = [r["step"] for r in metrics if r.get("moe")]
        ax.plot(steps, smooth(values), color=colour[name], lw=1.4, label=f"{name} (train batch)")
        evals = [(r["step"], statistics.fmean(x["max_vio"] for x in r["val_moe"]))
                 for r in metrics if r.get("val_moe")]
        if evals:
            ax.plot(*zip(*evals), color=colour[name], ls="--", marker="o", ms=3, lw=1.0,
                    label=f"{name} (validation set)")
    ax.axhline(MAXVIO_TARGET, color="grey", lw=0.8, ls=":", label=f"{MAXVIO_TARGET} target")
    # Early steps can reach MaxVio ~E (all tokens on one expert); cap the axis to keep the end readable.
    ax.set(xlabel="optimizer step", ylabel="MaxVio (mean over layers)",
           title="load imbalance over training (axis capped at 2)", ylim=(0, 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def write_report(folder: str | Path, runs: dict[str, dict], *, config: dict, corpus: str,
                 validation: str = "") -> Path:
    """Write summary.md, summary.json and the PNG plots into `folder`; returns it.

    runs: {variant: {"metrics": {seed: records}, "total_params", "active_params", "flops_per_token",
    "description", "balanced"}}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    text = markdown(summary, config=config, corpus=corpus, validation=validation)
    (folder / "summary.md").write_text(text)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    colour = colours(list(runs))
    plot_val_loss(runs, folder / "val_loss.png", colour)
    plot_max_vio(runs, folder / "max_vio.png", colour)
    for name, run in runs.items():
        metrics = next(iter(run["metrics"].values()))
        if any(r.get("moe") for r in metrics):
            plot_expert_load(name, metrics, folder / f"expert_load_{name}.png")
    return folder
