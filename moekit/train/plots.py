"""Plot helpers shared by the `moekit compare` and `moekit sweep` reports (matplotlib object API).

One colour per series across every plot of a report (`colours`), the mean validation curve over
seeds with its seed range shaded, and the dense model's final loss as a labelled line.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from matplotlib.axes import Axes

from moekit.train.curves import val_curve


def colours(names: list[str]) -> dict[str, str]:
    """A fixed colour per name, in order (matplotlib's tab10 cycle, then tab20 beyond 10)."""
    if len(names) <= 10:
        return {n: f"C{i}" for i, n in enumerate(names)}
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {n: cmap(i % 20) for i, n in enumerate(names)}


def mean_curve(per_seed: dict[int, list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) of the validation curves of several seeds, over the steps they share."""
    curves = [dict(zip(*val_curve(m))) for m in per_seed.values()]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    values = np.array([[c[s] for s in steps] for c in curves], dtype=float).reshape(len(curves), len(steps))
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def plot_curve(ax: Axes, x: np.ndarray, mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, colour: str,
               label: str, dense: bool) -> None:
    """The mean curve (dashed and thicker for the dense baseline), its seed range shaded."""
    ax.plot(x, mean, color=colour, lw=2.2 if dense else 1.6, ls="--" if dense else "-", label=label)
    if (hi > lo).any():
        ax.fill_between(x, lo, hi, color=colour, alpha=0.18, lw=0)


def loss_panels(ax_steps: Axes, ax_flops: Axes, runs: dict[str, dict], colour: dict[str, str],
                label: Callable[[str, dict], str]) -> dict[str, tuple[float, float]]:
    """Each run's mean validation curve (seed range shaded) against steps and against training
    FLOPs (its `flops_per_token`); returns each plotted run's (lowest, highest) value by name
    (runs without a validation point yet are left out)."""
    ranges = {}
    for name, run in runs.items():
        steps, mean, lo, hi = mean_curve(run["metrics"])
        if not len(steps):
            continue
        first = next(iter(run["metrics"].values()))
        tokens_per_step = first[0]["tokens"] / first[0]["step"]
        for ax, x in ((ax_steps, steps), (ax_flops, steps * tokens_per_step * run["flops_per_token"])):
            plot_curve(ax, x, mean, lo, hi, colour=colour[name], label=label(name, run), dense=name == "dense")
        ranges[name] = (float(lo.min()), float(hi.max()))
    return ranges


def clip_loss_axes(axes: tuple[Axes, ...], ranges: dict[str, tuple[float, float]]) -> None:
    """Loss axes from just below the lowest curve to at most 2 nats above it."""
    if ranges:
        low, high = min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
        for ax in axes:
            ax.set_ylim(low - 0.05, min(high, low + 2.0) + 0.05)


def dense_line(ax: Axes, final: float) -> None:
    ax.axhline(final, color="grey", lw=0.9, ls=":", label=f"dense final val loss {final:.3f}")


def smooth(values: list[float], window: int = 10) -> np.ndarray:
    """Trailing moving average (partial windows at the start)."""
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return v
    kernel = np.ones(window) / window
    head = np.cumsum(v[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])
