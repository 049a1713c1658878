"""Which resident expert an expert cache evicts: LRU, LFU, pinned-by-frequency and Belady's optimum.

One implementation of each policy, used by the live cache (`expert_cache.ExpertCache`) and by the
simulator that replays a routing trace (`cache_sim`, `moekit cache-sim`), so a simulated hit rate
is the live cache's. A policy sees three events: `insert` (a key was read into a slot), `touch`
(a layer call used it) and `drop` (it was evicted), and names a `victim` among the keys the cache
may evict. Keys read but not used yet (a prefetch) go first, oldest first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Literal

Key = tuple[int, int]  # (layer index, expert id)
Policy = Literal["lru", "lfu", "pinned"]
POLICIES = ("lru", "lfu", "pinned")  # the live cache's; the simulator adds "belady"


class LRU:
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self.fresh: OrderedDict[Key, None] = OrderedDict()  # read, not used since
        self.recency: OrderedDict[Key, None] = OrderedDict()  # least recent first

    def insert(self, key: Key) -> None:
        if key not in self.recency:
            self.fresh[key] = None

    def touch(self, key: Key) -> None:
        self.fresh.pop(key, None)
        self.recency[key] = None
        self.recency.move_to_end(key)

    def drop(self, key: Key) -> None:
        self.fresh.pop(key, None)
        self.recency.pop(key, None)

    def keep(self, key: Key) -> bool:
        """Never evict `key` (the pinned policy's sticky set)."""
        return False

    def in_order(self) -> Iterable[Key]:
        yield from self.fresh
        yield from self.recency

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        return next((k for k in self.in_order() if not self.keep(k) and evictable(k)), None)


class LFU(LRU):
    """Fewest uses first (uses counted over the whole run), then least recently used."""

    name = "lfu"

    def __init__(self, uses: Counter) -> None:
        super().__init__()
        self.uses = uses

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        best, best_rank = None, None
        for i, k in enumerate(self.in_order()):
            if evictable(k) and (best_rank is None or (self.uses[k], i) < best_rank):
                best, best_rank = k, (self.uses[k], i)
        return best


class Pinned(LRU):
    """The `sticky` keys (the most used experts of a recorded run) stay once read; the rest LRU."""

    name = "pinned"

    def __init__(self, sticky: Iterable[Key]) -> None:
        super().__init__()
        self.sticky = frozenset(sticky)

    def keep(self, key: Key) -> bool:
        return key in self.sticky


class Belady(LRU):
    """Belady's MIN: evict the key whose next use is farthest away (never = infinitely far), the
    optimum for a cache that reads on demand; the simulator's lower bound on misses. `next_use(key)`
    is the index of the next layer call that needs `key` (math.inf when none does)."""

    name = "belady"

    def __init__(self, next_use: Callable[[Key], float]) -> None:
        super().__init__()
        self.next_use = next_use

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        best, best_rank = None, None
        for i, k in enumerate(self.in_order()):
            if evictable(k) and (best_rank is None or (-self.next_use(k), i) < best_rank):
                best, best_rank = k, (-self.next_use(k), i)
        return best


CachePolicy = LRU  # every policy is an LRU subclass with its own victim / keep


def top_experts(counts: dict[Key, int], n: int) -> list[Key]:
    """The n most used keys (ties: lower layer, then lower expert): what the pinned policy keeps."""
    return sorted(counts, key=lambda k: (-counts[k], k))[:n]


def make_policy(policy: str, *, uses: Counter, sticky: Iterable[Key] = ()) -> CachePolicy:
    """The live cache's policy by name ("lru", "lfu", "pinned" with `sticky`)."""
    if policy == "lru":
        return LRU()
    if policy == "lfu":
        return LFU(uses)
    if policy == "pinned":
        return Pinned(sticky)
    raise ValueError(f"expert cache policy={policy!r} is invalid: must be one of {list(POLICIES)}")

