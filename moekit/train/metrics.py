"""Training metrics: per-layer routing summaries, a JSON-lines log, and a progress display.

Each step appends one JSON object to `metrics.jsonl`; the progress display is a rich bar with an
ETA on a terminal and a plain line every few steps otherwise (logs, CI).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from moekit.analysis.stats import routing_stats
from moekit.types import RoutingDecision


def summarize_routing(decisions: list[RoutingDecision]) -> dict[str, object]:
    """Routing statistics of one MoE layer over the micro-batches of a step.

    Token counts are summed (MaxVio is taken on the sums, as for one big batch); the dropped
    fraction and router entropy are averaged over micro-batches.
    """
    stats = [routing_stats(d) for d in decisions]
    counts = [sum(col) for col in zip(*(s["tokens_per_expert"] for s in stats))]
    mean = max(sum(counts) / len(counts), 1e-9)
    return {
        "tokens_per_expert": counts,
        "max_vio": max(counts) / mean - 1.0,
        "dropped_fraction": sum(s["dropped_fraction"] for s in stats) / len(stats),
        "router_entropy": sum(s["router_entropy"] for s in stats) / len(stats),
    }


def _parse(path: Path) -> tuple[list[tuple[str, dict]], str | None]:
    """(line, record) pairs of a metrics file, and a warning if its torn last line was dropped.

    Only the last line can be torn (a kill mid-append); an unreadable line before it is damage
    this file did not get from moekit, and raises a ValueError naming the line.
    """
    text = path.read_text()
    lines = text.splitlines()
    rows, warning = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if number == len(lines) and not text.endswith("\n"):
                warning = (f"warning: dropped the torn last line of {path} (the run was stopped while "
                           f"writing it): {line[:60]!r}")
                continue
            raise ValueError(f"{path} line {number} is not a metrics record ({err}); the file was "
                             f"damaged: repair or remove that line") from err
        rows.append((line, record))
    return rows, warning


class MetricsLog:
    """Appends records to `path` as JSON lines; `truncate_after(step)` drops records of later steps."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int, *, drop_at_step: tuple[str, ...] = ()) -> None:
        """Keep only records with step <= `step` (a resumed run rewrites what came after), and
        remove the keys `drop_at_step` from the record of `step` itself (a finished run's
        last-step-only figures, when it is extended).

        A torn last line is dropped with a warning; the file is replaced atomically, so a kill
        during the rewrite leaves the old file.
        """
        if not self.path.is_file():
            return
        from moekit.files import atomic_write

        rows, warning = _parse(self.path)
        if warning is not None:
            print(warning)

        def line_of(line: str, record: dict) -> str:
            if record.get("step") != step or not any(k in record for k in drop_at_step):
                return line
            return json.dumps({k: v for k, v in record.items() if k not in drop_at_step})

        kept = "".join(line_of(line, record) + "\n" for line, record in rows if record.get("step", 0) <= step)
        if kept != self.path.read_text():
            atomic_write(self.path, kept.encode())

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """fsync the log, so a checkpoint never holds a step whose metrics row could still be lost."""
        if self.path.is_file():
            with open(self.path, "rb+") as f:
                os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a killed run's) is left out."""
    return [record for _, record in _parse(Path(path))[0]]


# Wall-clock fields of a metrics record: the only ones a resumed run does not reproduce exactly.
TIMING_KEYS = ("tokens_per_s", "tokens_per_cpu_s")


@dataclass
class RunPlan:
    """The optimizer steps of several runs trained one after another (the variants of `moekit
    compare`, the points of `moekit sweep`), for one ETA over all of them.

    `finish_run(steps)` after each run; a Progress given this plan adds "run i of n" and the ETA of
    everything left, from the time per step trained so far in this process (resumed steps cost
    nothing, so they are not timed).
    """

    total_steps: int
    runs: int
    index: int = 0  # runs finished (or skipped as already complete)
    steps_done: int = 0  # steps of finished runs, trained or resumed
    steps_timed: int = 0  # steps trained in this process
    seconds: float = 0.0  # their wall time
    started: float = field(default_factory=time.monotonic)

    def eta(self, steps_in_run: int, seconds_in_run: float, trained_in_run: int) -> float | None:
        timed, seconds = self.steps_timed + trained_in_run, self.seconds + seconds_in_run
        if timed == 0:
            return None
        return seconds / timed * (self.total_steps - self.steps_done - steps_in_run)

    def describe(self, steps_in_run: int = 0, seconds_in_run: float = 0.0, trained_in_run: int = 0) -> str:
        eta = self.eta(steps_in_run, seconds_in_run, trained_in_run)
        left = "eta all ?" if eta is None else f"eta all {_duration(eta)}"
        return f"run {min(self.index + 1, self.runs)} of {self.runs}, {left}"

    def finish_run(self, steps: int, *, trained: int, seconds: float) -> None:
        self.index += 1
        self.steps_done += steps
        self.steps_timed += trained
        self.seconds += seconds


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A rich progress bar with ETA on a TTY, plain lines (every `every` steps) otherwise."""

    def __init__(self, total: int, *, start: int = 0, label: str = "train", every: int = 10,
                 enabled: bool = True, tty: bool | None = None, plan: RunPlan | None = None) -> None:
        self.total, self.label, self.every, self.enabled = total, label, every, enabled
        self.plan = plan
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.start_time = time.monotonic()
        self.start = start
        self._bar = None
        if enabled and self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task(label, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        plan = f" | {self.plan_text(step)}" if self.plan is not None else ""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info + plan)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.monotonic() - self.start_time
            done = step - self.start
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"{self.label} step {step}/{self.total} {info} eta {eta:.0f}s{plan}", flush=True)

    def plan_text(self, step: int) -> str:
        """"run i of n, eta all ..." of the plan, counting this run up to `step`."""
        assert self.plan is not None
        return self.plan.describe(step, time.monotonic() - self.start_time, step - self.start)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
