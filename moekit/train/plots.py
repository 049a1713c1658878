"""Plot helpers shared by the `moekit compare` and `moekit sweep` reports (matplotlib object API).

One colour per series across every plot of a report (`colours`), the mean validation curve over
seeds with its seed range shaded, and the dense model's final loss as a labelled line.
"""

from __future__ import annotations

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
