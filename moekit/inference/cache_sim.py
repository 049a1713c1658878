"""Replay a routing trace against the expert cache: hit rate and bytes read per token, per policy and
budget, to size a cache before buying memory (`moekit cache-sim`).

The replay drives the live `ExpertCache` itself (a pool of one byte per slot and a loader that reads
nothing) through the calls the offloaded experts make: per traced forward (`step_N`), per MoE layer
in depth order, `begin_call` with the distinct experts the layer's tokens used, then `acquire` /
`release` of each in the order the cache gives. So the policies are the live ones
(`cache_policy.py`) and, for a trace recorded from an offloaded run without prefetch, the simulated
counters equal the live cache's exactly. Prefetch is not simulated (it depends on router
predictions the trace does not hold). "belady" (evict the expert needed farthest in the future) is
the optimum, a lower bound on the misses of any policy that reads on demand.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import torch

from moekit.analysis.trace import RoutingTrace
from moekit.inference.cache_policy import Belady, Key, top_experts
from moekit.inference.expert_cache import ExpertCache, SlotSpec, num_slots

SIM_POLICIES = ("lru", "lfu", "pinned", "belady")
Call = tuple[int, tuple[int, ...]]  # (decoder layer, distinct experts in ascending order)


def layer_calls(trace: RoutingTrace) -> list[Call]:
    """The MoE layer calls of a trace in the order they ran: per forward (`step_N`; without it each
    token is a forward of its own, in trace order), per MoE layer in depth order, the distinct
    experts its tokens used (-1 slots skipped; a layer none of whose tokens used an expert makes no call)."""
    N = trace.num_tokens
    if trace.step_N is None:
        order_N, bounds = torch.arange(N), list(range(N + 1))
    else:
        order_N = torch.argsort(trace.step_N, stable=True)
        steps = trace.step_N[order_N]
        change = torch.nonzero(steps[1:] != steps[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), N]
    layers = sorted(trace.layers, key=lambda lt: lt.layer)
    ids = [lt.expert_ids_NK[order_N].tolist() for lt in layers]
    calls: list[Call] = []
    for lo, hi in pairwise(bounds):
        for lt, rows in zip(layers, ids):
            used = sorted({e for row in rows[lo:hi] for e in row if e >= 0})
            if used:
                calls.append((lt.layer, tuple(used)))
    return calls


def expert_uses(calls: list[Call]) -> Counter:
    """(layer, expert) -> number of layer calls that used it (the pinned policy's count table)."""
    return Counter((layer, e) for layer, experts in calls for e in experts)


@dataclass(frozen=True)
class SimResult:
    """One replay: counters as the live cache's `CacheStats` counts them."""

    policy: str
    budget: int
    slots: int
    hits: int
    misses: int
    bytes_read: int
    tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0


class _NextUse:
    """Belady's oracle: the index of the next call needing a key, after the current one."""

    def __init__(self, calls: list[Call]) -> None:
        self.at: dict[Key, list[int]] = {}
        for i, (layer, experts) in enumerate(calls):
            for e in experts:
                self.at.setdefault((layer, e), []).append(i)
        self.now = 0

    def __call__(self, key: Key) -> float:
        uses = self.at.get(key, [])
        j = bisect_right(uses, self.now)
        return uses[j] if j < len(uses) else math.inf


def simulate(calls: list[Call], *, slots: int, policy: str, read_bytes: dict[int, int], tokens: int,
             budget: int = 0, sticky: tuple[Key, ...] = ()) -> SimResult:
    """Replay `calls` against an ExpertCache of `slots` slots.

    Args:
        policy: "lru", "lfu", "pinned" (with `sticky`, the keys it keeps) or "belady".
        read_bytes: decoder layer -> bytes a miss reads (the live cache's `bytes_read` per miss).
        tokens: tokens of the trace (for bytes per token). budget: reported as given.
    """
    if policy not in SIM_POLICIES:
        raise ValueError(f"policy={policy!r} is invalid: must be one of {list(SIM_POLICIES)}")
    missing = sorted({layer for layer, _ in calls} - set(read_bytes))
    if missing:
        raise ValueError(f"read_bytes has no size for MoE layer(s) {missing}; the trace and the expert sizes "
                         f"come from different models")
    oracle = _NextUse(calls) if policy == "belady" else None
    cache = ExpertCache(SlotSpec((("b", (1,), torch.uint8),)), slots, lambda key, views: read_bytes[key[0]],
                        policy=Belady(oracle) if oracle is not None else policy,  # type: ignore[arg-type]
                        sticky=sticky)
    for i, (layer, experts) in enumerate(calls):
        if oracle is not None:
            oracle.now = i
        order = cache.begin_call(layer, list(experts))
        for e in order:
            cache.acquire((layer, e))
            cache.release((layer, e))
        cache.end_call()
    s = cache.stats
    return SimResult(policy=policy, budget=budget, slots=slots, hits=s.hits, misses=s.misses,
                     bytes_read=s.bytes_read, tokens=tokens)


def replay(trace: RoutingTrace, budgets: list[int], *, slot_bytes: int, read_bytes: dict[int, int] | int,
           policies: tuple[str, ...] = SIM_POLICIES, pin_fraction: float = 0.5) -> list[SimResult]:
    """Every (budget, policy) replay of `trace`; budgets in bytes, each holding budget // slot_bytes experts.

    read_bytes: bytes per miss, one int for every layer or per decoder layer. "pinned" keeps the
    trace's own most used experts (up to `pin_fraction` of the slots): the best a count table from an
    earlier run of the same workload can do. Raises ValueError for a budget below one expert."""
    if not 0 < pin_fraction < 1:
        raise ValueError(f"pin_fraction={pin_fraction} is invalid: must be in (0, 1)")
    for p in policies:
        if p not in SIM_POLICIES:
            raise ValueError(f"policy {p!r} is invalid: must be one of {list(SIM_POLICIES)}")
    if isinstance(read_bytes, int):
        read_bytes = {lt.layer: read_bytes for lt in trace.layers}
    calls = layer_calls(trace)
    if not calls:
        raise ValueError("the trace routes no token to any expert; there is nothing to replay")
    uses = expert_uses(calls)
    out = []
    for budget in budgets:
        slots = num_slots(budget, slot_bytes)
        if slots < 1:
            raise ValueError(f"budget {budget} bytes is smaller than one expert ({slot_bytes} bytes); give at "
                             f"least {slot_bytes} bytes")
        for policy in policies:
            sticky = tuple(top_experts(uses, int(slots * pin_fraction))) if policy == "pinned" else ()
            out.append(simulate(calls, slots=slots, policy=policy, read_bytes=read_bytes,
                                tokens=trace.num_tokens, budget=budget, sticky=sticky))
    return out
