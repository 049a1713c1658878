"""A byte-budgeted cache of routed experts keyed by (layer, expert), with pinning and prefetch.

The cache owns a fixed pool of slots, allocated once: `budget // slot_bytes` slots, each the bytes
of one expert in the layout the experts module computes with. A miss reads the expert into a free
slot or the slot of the victim the policy names. Slots in use are pinned (a count): a pinned slot is
never chosen as a victim, so an expert that the current layer call still reads cannot be overwritten
by a later miss or by the prefetch thread (the bug offloading caches are known for). The prefetch
thread reads predicted experts into unpinned slots and never waits for one.
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from moekit.inference.cache_policy import POLICIES, CachePolicy, Key, Policy, make_policy

__all__ = ["POLICIES", "CacheStats", "ExpertCache", "Key", "Policy", "SlotSpec", "num_slots"]
ALIGN = 64  # bytes; what torch's CPU allocator gives a fresh tensor


@dataclass(frozen=True)
class SlotSpec:
    """The tensors one expert occupies in a slot: (name, shape, dtype), in order. A 2-D tensor named
    in `transposed` is stored column-major (its transpose is contiguous), as the in-memory experts
    store that weight, so a matmul on the slot runs the in-memory model's kernel."""

    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    transposed: frozenset[str] = frozenset()

    def offsets(self) -> list[int]:
        """Byte offset of each tensor in a slot, each aligned to ALIGN."""
        out, at = [], 0
        for _, shape, dtype in self.tensors:
            out.append(at)
            at += _round_up(_nbytes(shape, dtype))
        return out

    @property
    def nbytes(self) -> int:
        _, shape, dtype = self.tensors[-1]
        return self.offsets()[-1] + _round_up(_nbytes(shape, dtype))


def num_slots(budget: int, slot_bytes: int) -> int:
    """Slots a byte budget holds: whole experts only."""
    return budget // slot_bytes


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class CacheStats:
    """Counters of one cache. A hit is a needed expert already resident (or being prefetched) when
    its layer call asked for it; prediction counters compare the experts prefetch predicted for a
    layer with the experts that layer then used."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    prefetch_reads: int = 0
    prefetch_hits: int = 0  # hits on an expert the prefetch thread brought in
    predicted: int = 0  # experts predicted for a layer call
    predicted_used: int = 0  # of those, experts the call then used
    needed_with_prediction: int = 0  # experts used by calls that had a prediction
    uses: Counter = field(default_factory=Counter)  # (layer, expert) -> times used

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prediction_recall(self) -> float:
        """Fraction of the experts a layer used that prefetch had predicted."""
        return self.predicted_used / self.needed_with_prediction if self.needed_with_prediction else 0.0

    @property
    def prediction_precision(self) -> float:
        """Fraction of predicted experts that the layer then used."""
        return self.predicted_used / self.predicted if self.predicted else 0.0

    def summary(self) -> dict[str, float | int]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4),
                "evictions": self.evictions, "bytes_read": self.bytes_read,
                "prefetch_reads": self.prefetch_reads, "prefetch_hits": self.prefetch_hits,
                "prediction_recall": round(self.prediction_recall, 4),
                "prediction_precision": round(self.prediction_precision, 4)}


class ExpertCache:
    """At most `num_slots` experts resident, read on demand by `load(key, views)`.

    Args:
        spec: the tensors of one expert in a slot.
        num_slots: slots in the pool (the byte budget divided by spec.nbytes).
        load: fills a slot's tensor views (name -> tensor) with expert `key`; returns bytes read.
        policy: "lru", "lfu" or "pinned" (with `sticky`: keys kept resident once loaded), or a
            `cache_policy` object (the simulator's Belady).
        prefetch: start a background thread for `prefetch(keys)`.
        device: where the slots live (the compute device of the experts).
    """

    def __init__(self, spec: SlotSpec, num_slots: int, load: Callable[[Key, dict[str, Tensor]], int], *,
                 policy: Policy | CachePolicy = "lru", sticky: Iterable[Key] = (), prefetch: bool = False,
                 device: str | torch.device = "cpu") -> None:
        if isinstance(policy, str) and policy not in POLICIES:
            raise ValueError(f"expert cache policy={policy!r} is invalid: must be one of {list(POLICIES)}")
        if num_slots < 1:
            raise ValueError(f"expert cache needs at least one slot of {spec.nbytes} bytes; got {num_slots}")
        sticky = frozenset(sticky)
        if policy == "pinned" and len(sticky) >= num_slots:
            raise ValueError(f"policy='pinned' keeps {len(sticky)} experts resident but the cache has "
                             f"{num_slots} slots; pin fewer than {num_slots} so misses have a slot")
        self.spec, self.num_slots, self._load = spec, num_slots, load
        self.stats = CacheStats()
        self._order = policy if not isinstance(policy, str) else make_policy(policy, uses=self.stats.uses,
                                                                                sticky=sticky)
        self.pool = torch.empty(num_slots * spec.nbytes, dtype=torch.uint8, device=device)
        self._views = [self._slot_views(i) for i in range(num_slots)]
        self._key_of: list[Key | None] = [None] * num_slots
        self._free = list(range(num_slots))  # a heap: the lowest free slot first
        self._slot_of: dict[Key, int] = {}
        self._pins = [0] * num_slots
        self._ready = [False] * num_slots
        self._prefetched = [False] * num_slots
        self._cond = threading.Condition()
        self._predicted: dict[int, set[int]] = {}
        self._early: set[Key] = set()  # pinned by begin_call, not yet acquired
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if prefetch:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._prefetch_loop, name="moekit-expert-prefetch",
                                            daemon=True)
            self._thread.start()

    @property
    def nbytes(self) -> int:
        return self.pool.numel()

    def _slot_views(self, i: int) -> dict[str, Tensor]:
        base = i * self.spec.nbytes
        views = {}
        for (name, shape, dtype), off in zip(self.spec.tensors, self.spec.offsets()):
            n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            flat = self.pool[base + off: base + off + n].view(dtype)
            views[name] = flat.view(shape[::-1]).T if name in self.spec.transposed else flat.view(shape)
        return views

    def snapshot(self) -> CacheStats:
        """A consistent copy of the counters (the live ones change under the engine's thread)."""
        with self._cond:
            return replace(self.stats, uses=Counter(self.stats.uses))

    def resident(self) -> set[Key]:
        with self._cond:
            return {k for k, s in self._slot_of.items() if self._ready[s]}

    # ---- the layer call's side ---------------------------------------------------------------
    def begin_call(self, layer: int, experts: list[int]) -> list[int]:
        """Start a layer call that needs `experts`: pin those already resident and count the
        prediction. Returns the experts in the order to compute them (resident ones first)."""
        with self._cond:
            predicted = self._predicted.pop(layer, None)
            if predicted is not None:
                used = predicted & set(experts)
                self.stats.predicted += len(predicted)
                self.stats.predicted_used += len(used)
                self.stats.needed_with_prediction += len(experts)
            present = []
            for e in experts:
                slot = self._slot_of.get((layer, e))
                if slot is not None:
                    self._pins[slot] += 1
                    present.append(e)
            rest = [e for e in experts if e not in present]
            self._early = {(layer, e) for e in present}
            return present + rest

    def acquire(self, key: Key) -> dict[str, Tensor]:
        """The slot views of `key`, pinned until `release(key)`; reads it in on a miss."""
        with self._cond:
            self.stats.uses[key] += 1
            pinned = key in self._early
            self._early.discard(key)
            slot = self._slot_of.get(key)
            while slot is not None and not self._ready[slot]:  # the prefetch thread is reading it
                if not pinned:
                    self._pins[slot] += 1
                    pinned = True
                self._cond.wait()
                if self._slot_of.get(key) != slot:  # that read failed and gave the slot back
                    slot, pinned = None, False
            if slot is not None:
                if not pinned:
                    self._pins[slot] += 1
                self.stats.hits += 1
                self.stats.prefetch_hits += self._prefetched[slot]
                self._prefetched[slot] = False
                self._order.touch(key)
                return self._views[slot]
            self.stats.misses += 1
            slot = self._claim(key, wait=True)
            assert slot is not None
        self._fill(slot, key, prefetched=False)
        with self._cond:
            self._order.touch(key)
        return self._views[slot]

    def end_call(self) -> None:
        """Unpin what `begin_call` pinned and the call did not acquire (it raised part way)."""
        with self._cond:
            for key in self._early:
                slot = self._slot_of.get(key)
                if slot is not None:
                    self._pins[slot] -= 1
            self._early = set()
            self._cond.notify_all()

    def release(self, key: Key) -> None:
        with self._cond:
            slot = self._slot_of[key]
            assert self._pins[slot] > 0, f"release of unpinned expert {key}"
            self._pins[slot] -= 1
            self._cond.notify_all()

    def _claim(self, key: Key, *, wait: bool) -> int | None:
        """A slot for `key` (free, else the policy's victim among unpinned ready slots), pinned and
        marked not ready. Called with the lock held; waits for a pin to go when `wait`."""
        def evictable(k: Key) -> bool:
            s = self._slot_of[k]
            return self._pins[s] == 0 and self._ready[s]

        while True:
            if self._free:
                slot = heapq.heappop(self._free)
                break
            victim = self._order.victim(evictable)
            if victim is not None:
                slot = self._slot_of.pop(victim)
                self._order.drop(victim)
                self.stats.evictions += 1
                break
            if not wait:
                return None
            self._cond.wait()  # every slot is pinned by a read in flight: one ends soon
        self._key_of[slot], self._slot_of[key] = key, slot
        self._pins[slot], self._ready[slot], self._prefetched[slot] = 1, False, False
        return slot

    def _fill(self, slot: int, key: Key, *, prefetched: bool) -> None:
        try:
            nbytes = self._load(key, self._views[slot])
        except BaseException:
            with self._cond:  # leave no half-read slot behind
                del self._slot_of[key]
                self._key_of[slot], self._pins[slot] = None, 0
                heapq.heappush(self._free, slot)
                self._cond.notify_all()
            raise
        with self._cond:
            self._ready[slot], self._prefetched[slot] = True, prefetched
            self._order.insert(key)
            self.stats.bytes_read += nbytes
            if prefetched:
                self.stats.prefetch_reads += 1
                self._pins[slot] -= 1
            self._cond.notify_all()

    # ---- prefetch --------------------------------------------------------------------------------
    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Predict that `layer`'s next call uses `experts`; read the absent ones in the background."""
        wanted = sorted(set(experts))
        with self._cond:
            self._predicted[layer] = set(wanted)
        if self._queue is not None:
            self._queue.put([(layer, e) for e in wanted])

    def _prefetch_loop(self) -> None:
        assert self._queue is not None
        while True:
            keys = self._queue.get()
            while keys is not None and not self._queue.empty():
                keys = self._queue.get()  # only the newest prediction is worth reading
            if keys is None:
                return
            for key in keys:
                with self._cond:
                    if key in self._slot_of:
                        continue
                    slot = self._claim(key, wait=False)
                if slot is None:
                    break  # every slot is in use: the layer call reads what it needs itself
                try:
                    self._fill(slot, key, prefetched=True)
                except Exception:  # noqa: BLE001 - the layer call will read it and raise the error
                    pass

    def close(self) -> None:
        """Stop the prefetch thread (waits for a read in flight)."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
