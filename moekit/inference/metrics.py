"""The server's `GET /metrics`: counters in the Prometheus text format, as vLLM and llama.cpp serve them.

Requests served (by finish reason), prompt and generated tokens, the engine's running and waiting
requests, and, for a model with offloaded experts, the expert cache's hits, misses, evictions,
bytes read, prefetch reads and hits, and how often the prefetch prediction was right. Names follow
vLLM's (`vllm:prompt_tokens_total`, ...) with the `moekit:` prefix; counters end in `_total`.
"""

from __future__ import annotations

import threading
from collections import Counter

from moekit.inference.engine import Engine, Request
from moekit.inference.expert_cache import ExpertCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerCounters:
    """What the server has served; `finished(request)` is called once per request, from the engine thread."""

    def __init__(self) -> None:
        self.by_reason: Counter = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._lock = threading.Lock()

    def finished(self, request: Request) -> None:
        with self._lock:
            self.by_reason[request.finish_reason] += 1
            self.prompt_tokens += len(request.prompt_ids)
            self.generation_tokens += len(request.output_ids)

    def copy(self) -> tuple[Counter, int, int]:
        with self._lock:
            return Counter(self.by_reason), self.prompt_tokens, self.generation_tokens


def _metric(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP moekit:{name} {help_text}", f"# TYPE moekit:{name} {kind}"]
    lines += [f"moekit:{name}{labels} {value:g}" if isinstance(value, float) else f"moekit:{name}{labels} {value}"
              for labels, value in samples]


def render(engine: Engine, counters: ServerCounters, model_name: str) -> str:
    """The /metrics page."""
    by_reason, prompt, generated = counters.copy()
    with engine.lock:
        # A finished request keeps its slot until the step's end: it is not running any more.
        running, waiting = sum(not r.done for r in engine.running), len(engine.waiting)
    tag = f'model_name="{model_name}"'
    lines: list[str] = []
    _metric(lines, "num_requests_running", "gauge", "Requests decoding now.", [(f"{{{tag}}}", running)])
    _metric(lines, "num_requests_waiting", "gauge", "Requests waiting for a slot.", [(f"{{{tag}}}", waiting)])
    reasons = sorted(set(by_reason) | {"stop", "length"})
    _metric(lines, "request_success_total", "counter", "Requests served, by finish reason.",
            [(f'{{{tag},finished_reason="{r}"}}', by_reason[r]) for r in reasons])
    _metric(lines, "prompt_tokens_total", "counter", "Prompt tokens of served requests.", [(f"{{{tag}}}", prompt)])
    _metric(lines, "generation_tokens_total", "counter", "Tokens generated for served requests.",
            [(f"{{{tag}}}", generated)])
    cache = getattr(engine.model, "expert_cache", None)
    if isinstance(cache, ExpertCache):
        s = cache.snapshot()
        one = lambda v: [(f"{{{tag}}}", v)]
        for name, value, help_text in (
                ("expert_cache_hits_total", s.hits, "Routed experts found in the cache when a layer needed them."),
                ("expert_cache_misses_total", s.misses, "Routed experts read from the files when a layer needed them."),
                ("expert_cache_evictions_total", s.evictions, "Experts evicted to make room."),
                ("expert_cache_read_bytes_total", s.bytes_read, "Bytes read from the checkpoint files."),
                ("expert_prefetch_reads_total", s.prefetch_reads, "Experts read by the prefetch thread."),
                ("expert_prefetch_hits_total", s.prefetch_hits, "Hits on experts the prefetch thread read."),
                ("expert_prefetch_predicted_total", s.predicted, "Experts the prefetch predicted."),
                ("expert_prefetch_predicted_used_total", s.predicted_used,
                 "Predicted experts the layer then used.")):
            _metric(lines, name, "counter", help_text, one(value))
        for name, value, help_text in (
                ("expert_cache_hit_rate", float(s.hit_rate), "hits / (hits + misses) since start."),
                ("expert_prefetch_recall", float(s.prediction_recall),
                 "Share of the experts a layer used that prefetch had predicted."),
                ("expert_prefetch_precision", float(s.prediction_precision),
                 "Share of predicted experts the layer then used."),
                ("expert_cache_slots", cache.num_slots, "Experts the cache holds."),
                ("expert_cache_bytes", cache.nbytes, "Bytes of the cache's slot pool.")):
            _metric(lines, name, "gauge", help_text, one(value))
    return "\n".join(lines) + "\n"
