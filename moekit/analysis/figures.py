"""Pictures of an analysis (matplotlib, Agg backend, PNG): each reads only `Analysis.to_dict()`.

domain x expert heatmaps, co-activation heatmaps, metrics beside their baselines, saturation
curves, knock-out bars, and a passage whose tokens are coloured by their first expert.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 80
MAX_PANELS = 8  # layers shown per figure (evenly spaced when a model has more)


def _panels(layers: list[dict]) -> list[dict]:
    if len(layers) <= MAX_PANELS:
        return layers
    step = (len(layers) - 1) / (MAX_PANELS - 1)
    return [layers[round(i * step)] for i in range(MAX_PANELS)]


def _grid(n: int, width: float = 4.0, height: float = 3.2):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _integer_ticks(ax, *, y: bool = False) -> None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def domain_heatmaps(data: dict, path: Path) -> Path | None:
    """Share of each domain's tokens at each expert, divided by the uniform share k/E (1 = chance)."""
    layers = [x for x in _panels(data["layers"]) if "domain" in x]
    names = data["info"].get("label_names") or []
    if not layers or not names:
        return None
    fig, axes = _grid(len(layers), width=max(4.0, 0.18 * layers[0]["num_experts"] + 2),
                      height=max(3.0, 0.22 * len(names) + 1.5))
    for ax, layer in zip(axes, layers):
        d = layer["domain"]
        ratio = [[s / d["uniform"] if d["uniform"] else 0.0 for s in row] for row in d["share"]]
        vmax = max(2.0, max(max(r) for r in ratio))
        im = ax.imshow(ratio, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer['layer']}: share / (k/E={d['uniform']:.2f})", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if len(names) <= 64 else [""] * len(names), fontsize=6 if len(names) <= 30 else 5)
        ax.tick_params(axis="x", labelsize=7)
        _integer_ticks(ax)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def coactivation_heatmaps(data: dict, path: Path) -> Path:
    layers = _panels(data["layers"])
    fig, axes = _grid(len(layers), width=3.6, height=3.2)
    for ax, layer in zip(axes, layers):
        c = layer["coactivation"]
        im = ax.imshow(c["p_b_given_a"], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {layer['layer']}: P(b|a), uniform {c['uniform']:.2f}", fontsize=9)
        ax.set_xlabel("b", fontsize=8)
        ax.set_ylabel("a", fontsize=8)
        ax.tick_params(labelsize=7)
        _integer_ticks(ax, y=True)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def cache_row(layer: dict) -> dict:
    """The cache simulation whose capacity is the layer's k (else the first one)."""
    rows = layer["cache"]
    return next((r for r in rows if r["capacity"] == max(round(layer["k"]), 1)), rows[0])


def baselines_chart(data: dict, path: Path) -> Path:
    """Per metric, one group of bars per layer: the measured value beside its null baselines."""
    layers = data["layers"]
    panels = []
    if all("domain" in x for x in layers):
        panels.append(("domain specialization\n(mean over domains of max share)",
                       [("measured", lambda x: x["domain"]["mean_max_share"]),
                        ("shuffled labels", lambda x: x["domain"]["mean_max_share_shuffled"]),
                        ("uniform k/E", lambda x: x["domain"]["uniform"])]))
    panels += [
        ("vocabulary specialization", [("measured", lambda x: x["vocabulary"]["score"]),
                                       ("shuffled ids", lambda x: x["vocabulary"]["score_shuffled"]),
                                       ("uniform k/E", lambda x: x["vocabulary"]["uniform"])]),
        ("next token keeps first expert", [("measured", lambda x: x["locality"]["same_first"]),
                                           ("random pairs", lambda x: x["locality"]["same_first_random_pairs"]),
                                           ("uniform 1/E", lambda x: x["locality"]["same_first_uniform"])]),
        ("LRU hit rate, cache of k experts", [("measured", lambda x: cache_row(x)["lru_hit_rate"]),
                                              ("shuffled order", lambda x: cache_row(x)["lru_hit_rate_shuffled"]),
                                              ("uniform routing", lambda x: cache_row(x)["uniform"])]),
    ]
    fig, axes = _grid(len(panels), width=4.2, height=3.0)
    colors = ["tab:blue", "tab:orange", "tab:gray"]
    for ax, (title, series) in zip(axes, panels):
        width = 0.8 / len(series)
        for j, (name, get) in enumerate(series):
            xs = [i + j * width for i in range(len(layers))]
            ax.bar(xs, [get(x) for x in layers], width=width, label=name, color=colors[j])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))])
        ax.set_xticklabels([str(x["layer"]) for x in layers], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def saturation_curves(data: dict, path: Path) -> Path | None:
    sat = data.get("saturation")
    if not sat or not sat["steps"]:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, layer in enumerate(sat["layers"]):
        ax.plot(sat["steps"], [row[i] for row in sat["overlap"]], marker="o", label=f"layer {layer}")
    ax.set_xlabel("training step")
    ax.set_ylabel("top-k overlap with final")
    ax.set_ylim(0, 1.05)
    ax.set_title("router saturation", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def knockout_bars(data: dict, path: Path) -> Path | None:
    ko = data.get("knockout")
    if not ko:
        return None
    layers = data["layers"]
    fig, axes = _grid(min(len(layers), MAX_PANELS), width=4.0, height=2.8)
    for ax, layer, rows, shared in zip(axes, layers, ko["experts"], ko["shared"]):
        labels = [str(r["expert"]) for r in rows]
        deltas = [r["delta"] for r in rows]
        if shared is not None:
            labels.append("shared")
            deltas.append(shared["delta"])
        ax.bar(range(len(deltas)), deltas, color=["tab:red" if lab == "shared" else "tab:blue" for lab in labels])
        ax.set_xticks(range(len(deltas)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90 if len(labels) > 16 else 0)
        ax.set_title(f"layer {layer['layer']}: loss change (base {ko['base_loss']:.3f})", fontsize=9)
        ax.set_xlabel("expert knocked out", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    return _save(fig, path)


def expert_colors(num_experts: int) -> list[str]:
    cmap = plt.get_cmap("tab20" if num_experts > 10 else "tab10")
    return [matplotlib.colors.to_hex(cmap(e % cmap.N)) for e in range(num_experts)]


def coloured_text(pieces: list[tuple[str, int]], num_experts: int, path: Path, *, title: str,
                  width: int = 90, max_lines: int = 24) -> Path:
    """Each token's text on a background of its first expert's colour (monospace layout)."""
    colors = expert_colors(num_experts)
    placed, line, col = [], 0, 0
    for text, expert in pieces:
        for k, part in enumerate(text.split("\n")):
            if k:
                line, col = line + 1, 0
            while part:
                room = width - col
                if room <= 0:
                    line, col = line + 1, 0
                    continue
                chunk, part = part[:room], part[room:]
                placed.append((line, col, chunk, expert))
                col += len(chunk)
        if line >= max_lines:
            break
    lines = min(line + 1, max_lines)
    fig = plt.figure(figsize=(width * 0.085 + 0.4, lines * 0.22 + 0.8))
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98 - 0.35 / (lines * 0.22 + 0.8)])
    ax.set_xlim(0, width)
    ax.set_ylim(lines, -0.5)
    ax.axis("off")
    for ln, c, chunk, expert in placed:
        if ln >= max_lines:
            continue
        ax.add_patch(matplotlib.patches.Rectangle((c, ln - 0.45), len(chunk), 0.9, color=colors[expert],
                                                  alpha=0.55 if expert >= 0 else 0.0, linewidth=0))
        ax.text(c, ln, chunk.replace("$", r"\$"), family="monospace", fontsize=9, va="center", ha="left")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
