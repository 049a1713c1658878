"""Record the routing trace of a live run (generation or serving) in `moekit.analysis.trace`'s format.

The engine hands every model forward to `TraceRecorder.record`: the forward's token ids, which
request (sequence) each row is, the position of its first token, and the routing of every MoE
layer. Each forward becomes one step (`step_N`), so a replay (`moekit cache-sim`) sees the same
layer calls an expert cache saw. Thread-safe: the server records in its engine thread and saves at
shutdown.
"""

from __future__ import annotations

import threading
from pathlib import Path

from torch import Tensor

from moekit.analysis.trace import RoutingTrace, concat_traces, trace_from_routing
from moekit.types import RoutingDecision


class TraceRecorder:
    """Collects (layer, token, experts) of every forward it is given; `trace()` joins them.

    Args:
        max_tokens: stop recording (and say so in `truncated`) after this many tokens; None records all.
    """

    def __init__(self, *, max_tokens: int | None = None) -> None:
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r} is invalid: must be a positive integer or None")
        self.max_tokens = max_tokens
        self._parts: list[RoutingTrace] = []
        self._steps = 0
        self._tokens = 0
        self.truncated = False
        self._lock = threading.Lock()

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def record(self, routing: list[RoutingDecision | None], tokens_BS: Tensor, *, sequence_B: Tensor,
               start_B: Tensor) -> None:
        """One model forward: `routing` is its `ModelOutput.routing`; tokens_BS long (B, S);
        sequence_B long (B,) request id of each row; start_B long (B,) position of each row's first token."""
        if not any(d is not None for d in routing):
            return  # a dense model: nothing is routed
        with self._lock:
            if self.truncated or (self.max_tokens is not None and self._tokens + tokens_BS.numel() > self.max_tokens):
                self.truncated = True
                return
            part = trace_from_routing(routing, tokens_BS, sequence_B=sequence_B, start_B=start_B, step=self._steps)
            self._parts.append(part)
            self._steps += 1
            self._tokens += part.num_tokens

    def trace(self) -> RoutingTrace:
        """The trace so far; a ValueError when nothing was recorded."""
        with self._lock:
            if not self._parts:
                raise ValueError("no routing was recorded: the run made no forward through an MoE layer")
            if len(self._parts) > 1:  # join once, keep the joined trace for the next call
                self._parts = [concat_traces(self._parts)]
            return self._parts[0]

    def save(self, path: str | Path) -> Path:
        """Write the trace (safetensors, `moekit.analysis.trace`'s format) whole or not at all."""
        return self.trace().save(path)


def check_trace_path(path: str | Path, what: str = "--trace") -> Path:
    """A file path the trace can be written to later (checked before a long run)."""
    from moekit.hf.io import check_not_a_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name, e.g. {path / 'trace.safetensors'}")
    check_not_a_file(path.parent, f"{what} folder")
    return path
