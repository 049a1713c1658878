"""The `moekit sweep` report: final validation loss per point over seeds, which differences exceed
the seed-to-seed spread, and the scaling figure (validation loss against steps, training FLOPs and
total parameters)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure

from moekit.train.curves import Spread, separated, spread, val_curve
from moekit.train.plots import clip_loss_axes, colours, dense_line, loss_panels


def summarize_sweep(runs: dict[str, dict]) -> dict[str, dict]:
    """Per point: its axes, parameter and FLOP counts, final validation loss over seeds, and whether
    it differs from the dense model and from the previous point on its curve by more than the spread."""
    finals = {name: spread([val_curve(m)[1][-1] for m in run["metrics"].values() if val_curve(m)[1]])
              for name, run in runs.items()}
    out: dict[str, dict] = {}
    previous: dict[tuple[int, int, int], str] = {}  # (top_k, granularity, shared) -> the curve's last point
    for name, run in runs.items():
        point = run["point"]
        final, dense = finals[name], finals.get("dense")
        curve = (point.top_k, point.granularity, point.shared)
        prev = previous.get(curve, "dense" if "dense" in runs and name != "dense" else None)
        out[name] = {
            "experts": point.experts, "top_k": point.top_k, "granularity": point.granularity, "shared": point.shared,
            "expert_width": run["model"].moe.d_ff if run["model"].moe is not None else run["model"].d_ff,
            "total_params": run["total_params"], "active_params": run["active_params"],
            "flops_per_token": run["flops_per_token"], "description": run["description"],
            "final_val_loss": asdict(final) if final is not None else None,
            "vs_dense": None if name == "dense" or final is None or dense is None else
            {"difference": final.mean - dense.mean, "beyond_spread": separated(final, dense)},
            "vs_previous": None if prev is None or final is None or finals.get(prev) is None else
            {"previous": prev, "difference": final.mean - finals[prev].mean,
             "beyond_spread": separated(final, finals[prev])},
        }
        if name != "dense":
            previous[curve] = name
    return out


def _verdict(cmp: dict | None) -> str:
    if cmp is None:
        return "-"
    beyond = {True: "beyond the seed spread", False: "within the seed spread",
              None: "spread unknown (one seed)"}[cmp["beyond_spread"]]
    return f"{cmp['difference']:+.4f} ({beyond})"


def sweep_markdown(summary: dict[str, dict], *, config: dict, corpus: str, validation: str) -> str:
    lines = ["# moekit sweep", "", f"Corpus: {corpus}", "",
             f"Validation loss: {validation}.", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in config.items()), "",
             "| point | experts (E x granularity) | active experts | expert width | total params | active params "
             "| training FLOPs/token | final val loss | vs dense | vs previous point |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        final = Spread(**s["final_val_loss"]).text(".4f") if s["final_val_loss"] else "-"
        e, k = s["experts"] * s["granularity"], s["top_k"] * s["granularity"]
        active = "dense" if name == "dense" else f"1 shared + top-{k - 1}" if s["shared"] else f"top-{k}"
        prev = s["vs_previous"]
        lines.append(f"| {name} | {e} ({s['experts']} x {s['granularity']}) | {active} | {s['expert_width']} "
                     f"| {s['total_params']:,} | {s['active_params']:,} | {s['flops_per_token']:,.0f} | {final} "
                     f"| {_verdict(s['vs_dense'])} | "
                     f"{_verdict(prev) + ' vs ' + prev['previous'] if prev else '-'} |")
    lines += ["", "Final val loss: mean ± sample standard deviation over seeds. A difference is beyond "
              "the seed spread when the two points' seed ranges do not overlap (every seed of one is "
              "lower than every seed of the other). Training FLOPs per token: 6 x active non-embedding "
              "parameters (the router included) + 6 x layers x seq_len x d_model.", "",
              "![validation loss](sweep.png)", ""]
    return "\n".join(lines)


def plot_sweep(runs: dict[str, dict], summary: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(16, 4.6))
    ax_s, ax_f, ax_p = fig.subplots(1, 3)
    colour = colours(list(runs))
    ranges = loss_panels(ax_s, ax_f, runs, colour, lambda name, run: name)
    for name in ranges:  # the points with a validation curve
        run = runs[name]
        s = Spread(**summary[name]["final_val_loss"])
        ax_p.errorbar([run["total_params"]], [s.mean], yerr=[[s.mean - s.lo], [s.hi - s.mean]], fmt="o",
                      color=colour[name], capsize=3, label=name)
    curves: dict[tuple[int, int, int], list[str]] = {}
    for name, s in summary.items():
        if name != "dense":
            curves.setdefault((s["top_k"], s["granularity"], s["shared"]), []).append(name)
    for names in curves.values():  # join each curve's points, starting from dense
        names = (["dense"] if "dense" in summary else []) + names
        xs = [summary[n]["total_params"] for n in names]
        ys = [summary[n]["final_val_loss"]["mean"] for n in names]
        ax_p.plot(xs, ys, color="grey", lw=0.8, zorder=0)
    if "dense" in summary:
        for ax in (ax_s, ax_f, ax_p):
            dense_line(ax, summary["dense"]["final_val_loss"]["mean"])
    ax_s.set(xlabel="optimizer step", ylabel="validation loss (nats/token)", title="validation loss vs steps")
    ax_f.set(xlabel="training FLOPs (router included)", ylabel="validation loss",
             title="validation loss vs training compute")
    ax_p.set(xlabel="total parameters", ylabel="final validation loss (mean, seed range)", xscale="log",
             title="final validation loss vs total parameters")
    for ax in (ax_s, ax_f, ax_p):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    clip_loss_axes((ax_s, ax_f), ranges)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_sweep_report(folder: str | Path, runs: dict[str, dict], *, config: dict, corpus: str,
                       validation: str) -> Path:
    """summary.md, summary.json and sweep.png in `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize_sweep(runs)
    (folder / "summary.md").write_text(sweep_markdown(summary, config=config, corpus=corpus,
                                                      validation=validation))
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_sweep(runs, summary, folder / "sweep.png")
    return folder
