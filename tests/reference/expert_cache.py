"""Slow, obviously-correct expert caches: a list of resident keys replayed over layer calls."""

from __future__ import annotations

import math


def simulate(calls, slots: int, policy: str, sticky=frozenset()) -> tuple[int, int]:
    """Per call, resident experts first (ascending), then the rest; victims: "lru" least recent,
    "lfu" fewest uses then least recent, "pinned" LRU among keys not in `sticky`, "belady" the key
    whose next use (index of a later call needing it) is farthest, then least recent.
    `calls` is [(layer, sorted distinct experts)]. Returns (hits, misses)."""
    resident: list[tuple[int, int]] = []  # least recent first
    uses: dict = {}
    hits = misses = 0

    def next_use(key, now: int) -> float:
        return next((j for j in range(now + 1, len(calls)) if key[0] == calls[j][0] and key[1] in calls[j][1]),
                    math.inf)

    for i, (layer, experts) in enumerate(calls):
        keys = [(layer, e) for e in experts]
        order = [k for k in keys if k in resident] + [k for k in keys if k not in resident]
        for key in order:
            uses[key] = uses.get(key, 0) + 1
            if key in resident:
                hits += 1
                resident.remove(key)
            else:
                misses += 1
                if len(resident) == slots:
                    if policy == "lfu":
                        victim = min(resident, key=lambda k: (uses[k], resident.index(k)))
                    elif policy == "belady":
                        victim = min(resident, key=lambda k: (-next_use(k, i), resident.index(k)))
                    else:
                        victim = next(k for k in resident if k not in sticky)
                    resident.remove(victim)
            resident.append(key)
    return hits, misses
