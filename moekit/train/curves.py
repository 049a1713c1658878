"""Pure arithmetic on training curves: validation curves, the interpolated step a curve reaches a
loss, layer averages, and statistics over seeds (mean, spread, whether two results are separated).

Two results differ by more than the seed-to-seed spread when their seed ranges do not overlap:
every seed of one is better than every seed of the other (with one seed each, nothing is said).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


def val_curve(metrics: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, validation losses) of the evaluations in a metrics log."""
    points = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    return [p[0] for p in points], [p[1] for p in points]


def steps_to_reach(metrics: list[dict], target: float) -> float | None:
    """The step at which the validation loss first reaches `target`, linearly interpolated between
    the evaluation above it and the first one at or below it (so the answer does not jump by the
    evaluation interval); the first evaluation's step if that one is already below; None if never."""
    steps, losses = val_curve(metrics)
    for i, (step, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(step)
            s0, l0 = steps[i - 1], losses[i - 1]
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
    return None


def layer_mean(metrics: list[dict], key: str) -> list[float]:
    """Per step, `key` of the MoE layers averaged over layers."""
    return [sum(m[key] for m in r["moe"]) / len(r["moe"]) for r in metrics if r.get("moe")]


def final_val_max_vio_layers(metrics: list[dict]) -> list[float] | None:
    """Per MoE layer, MaxVio over the held-out set at the end: the final whole-set evaluation
    (`full_val_moe`) when the run has one, else the last evaluation's (None without one)."""
    whole = [r["full_val_moe"] for r in metrics if r.get("full_val_moe")]
    evals = whole or [r["val_moe"] for r in metrics if r.get("val_moe")]
    return [x["max_vio"] for x in evals[-1]] if evals else None


def final_full_val_loss(metrics: list[dict]) -> float | None:
    """The final validation loss on the whole held-out set (None if the run has no such evaluation)."""
    whole = [r["full_val_loss"] for r in metrics if "full_val_loss" in r]
    return whole[-1] if whole else None


@dataclass(frozen=True)
class Spread:
    """A quantity over seeds: mean, sample standard deviation (0 for one seed), range, count."""

    mean: float
    std: float
    lo: float
    hi: float
    n: int

    def text(self, spec: str = ".4f", unit: str = "") -> str:
        """'4.2391' for one seed, '4.2391 ± 0.0120 (3 seeds)' for several; `unit` follows each
        number ('0.85x ± 0.03x (3 seeds)')."""
        if self.n == 1:
            return f"{self.mean:{spec}}{unit}"
        return f"{self.mean:{spec}}{unit} ± {self.std:{spec}}{unit} ({self.n} seeds)"


def spread(values: list[float]) -> Spread | None:
    """The Spread of `values` (None when empty)."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Spread(statistics.fmean(values), std, min(values), max(values), len(values))


def separated(a: Spread | None, b: Spread | None) -> bool | None:
    """Whether a and b differ by more than the seed-to-seed spread (their seed ranges do not
    overlap); None when either has fewer than two seeds, so the spread is unknown."""
    if a is None or b is None or a.n < 2 or b.n < 2:
        return None
    return a.hi < b.lo or b.hi < a.lo
