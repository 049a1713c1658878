"""Continuous batching: requests join between decode steps, finished ones leave, and every running
request shares each decode forward.

One `step()` admits waiting requests into free slots, runs one prefill forward (the next L
prompt tokens of every request still in its prompt, L the shortest remainder and at most about
`prefill_chunk` tokens in all, so a long prompt delays the running decodes by one chunk, not by
its whole length, and requests that arrive together share their prefill), then one decode forward
over every request that has a token to extend, and retires finished or cancelled requests.

The cache is preallocated per slot (`moekit.model.cache.SlotStore`: max_batch_size rows of max_len
positions per layer), not paged: a row is indexed by position directly, so each row's keys are
exactly the ones it would have alone and the decode step needs no block tables or gathers (pure
torch has no paged-attention kernel, and a gather per layer per step would cost more than the
memory it saves at the batch sizes and context lengths a CPU serves). The price is memory sized for
the longest request in every slot (bounded by `max_len`). Every decoder family runs: the row cache
holds attention K/V, MLA latents (sliding-window layers keep all positions, the mask applies the
window) and per-slot Mamba states.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit.inference.load import LoadedModel
from moekit.inference.sampling import SamplingParams, sample
from moekit.inference.text import TextStream
from moekit.inference.trace_recorder import TraceRecorder
from moekit.model.cache import SlotStore
from moekit.traits import ROUTER_TRAITS, generation_error


def batch_coupling(model: torch.nn.Module) -> str | None:
    """Why rows of one forward would change each other's routing, or None when they cannot.

    A router whose eval-mode routing looks at other tokens (its `causal` trait in moekit/traits.py)
    and any expert capacity (token dropping) decide per batch, so a request's output would depend
    on its neighbours.
    """
    for i, layer in enumerate(model.moe_layers()):  # type: ignore[operator]
        cfg = layer.config
        if ROUTER_TRAITS[cfg.router].causal not in ("token", "at_eval"):
            return f"MoE layer {i} uses router={cfg.router!r}, which routes each token against the whole batch"
        if cfg.capacity_factor is not None or cfg.expert_capacity is not None:
            return f"MoE layer {i} limits expert capacity (tokens are dropped depending on the batch)"
    return None


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit (the server answers 429)."""


@dataclass(eq=False)
class Request:
    """One completion. Set `prompt_ids` and `params`; the engine fills the rest.

    `on_event(request, text_delta)` is called from the engine's thread after every token (and
    once more, with `finish_reason` set, when the request ends: after its slot is freed, so a
    client that has its answer sees the engine without it). With `routing`, `routing_counts`
    maps each MoE layer index to a long (E,) count of this request's tokens per expert.
    """

    prompt_ids: list[int]
    params: SamplingParams
    routing: bool = False
    on_event: Callable[[Request, str], None] | None = None
    id: int = -1
    slot: int | None = None
    prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # with finish_reason "error": what went wrong
    cancelled: bool = False
    routing_counts: dict[int, torch.Tensor] = field(default_factory=dict)
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    _stream: TextStream | None = None
    _generator: torch.Generator | None = None
    _last_delta: str = ""  # the text of the finishing event, sent once the slot is freed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Schedules requests over `max_batch_size` cache slots of one loaded model.

    Drive it with `step()` (or `run(stop_event)` in a thread); `submit` and `cancel` may be called
    from other threads. At most max_batch_size requests run and max_queue more wait; beyond that
    `submit` raises QueueFull. With `trace` (a TraceRecorder), every forward's routing is recorded.
    """

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 8, max_len: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256, trace: TraceRecorder | None = None) -> None:
        for name, value, least in (("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 0),
                                   ("prefill_chunk", prefill_chunk, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {least}")
        self.loaded, self.model = loaded, loaded.model
        context = loaded.context_length
        self.max_len = context if max_len is None else max_len
        if not isinstance(self.max_len, int) or not 1 <= self.max_len <= context:
            raise ValueError(f"max_len={max_len!r} is invalid: must be an integer in [1, {context}] "
                             f"(the model's context length)")
        if self.model.config.moe is not None and (err := generation_error(self.model.config.moe.router)):
            raise ValueError(err)
        coupling = batch_coupling(self.model)
        if coupling is not None and max_batch_size > 1:
            raise ValueError(f"max_batch_size={max_batch_size} is invalid for this model: {coupling}, so "
                             f"batched requests would change each other's output; use max_batch_size=1")
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.store = SlotStore(self.model.config.n_layers, max_batch_size, self.max_len)
        self.free: list[int] = list(range(max_batch_size))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self._ids = itertools.count()
        self.device = next(self.model.parameters()).device
        self.trace = trace  # records every forward's routing (moekit.inference.trace_recorder)
        # Prompts of several requests share a prefill forward, each cut at the same length. Not
        # with RoPE whose frequencies depend on the sequence length so far (dynamic NTK, longrope):
        # there a prompt's cut points change its keys, so it keeps the chunks it would have alone.
        rope = self.model.config.rope
        self.group_prefill = rope is None or rope.scaling not in ("dynamic", "longrope")

    # ---- called from any thread ----
    def submit(self, request: Request) -> Request:
        """Queue a request. Raises ValueError for an empty or too long one, QueueFull when full."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if n + request.params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({request.params.max_new_tokens}) is "
                             f"{n + request.params.max_new_tokens}, beyond the context window of "
                             f"{self.max_len}")
        seed = request.params.seed
        if seed is None:
            seed = random.SystemRandom().getrandbits(63)
        request._generator = torch.Generator().manual_seed(seed)
        request._stream = TextStream(self.loaded.tokenizer, request.params.stop)
        request.t_submit = time.perf_counter()
        with self.lock:
            if len(self.waiting) + len(self.running) >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"{self.max_batch_size} requests are running and {len(self.waiting)} waiting "
                                f"(the limit); retry later")
            request.id = next(self._ids)
            self.waiting.append(request)
        self.wakeup.set()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away); its slot is freed at the next step."""
        request.cancelled = True
        self.wakeup.set()

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.running)

    def run(self, stop: threading.Event, idle_wait: float = 0.05) -> None:
        """Step until `stop` is set, sleeping while there is nothing to do. A step that raises ends
        the requests it was running with finish_reason "error"; the loop goes on serving."""
        while not stop.is_set():
            if not self.has_work():
                self.wakeup.wait(idle_wait)
                self.wakeup.clear()
                continue
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - one bad step must not stop the server
                self.fail_running(f"{type(err).__name__}: {err}")

    def fail_running(self, message: str) -> None:
        """End every running request with finish_reason "error" and free the slots."""
        for request in list(self.running):
            if not request.done:
                request.error = message
                self._finish(request, "error")
        self._retire()

    # ---- the engine's own thread ----
    @torch.inference_mode()
    def step(self) -> None:
        self._admit()
        self._retire()
        prefilling = [r for r in self.running if r.prefilled < len(r.prompt_ids)]
        if not self.group_prefill:
            prefilling = prefilling[:1]
        if prefilling:
            self._prefill_chunk(prefilling)
        ready = [r for r in self.running if r.prefilled == len(r.prompt_ids) and r.output_ids and not r.done
                 and r not in prefilling]
        if ready:
            self._decode(ready)
        self._retire()

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and self.free:
                request = self.waiting.popleft()
                if request.cancelled:
                    self._finish(request, "cancelled")
                    continue
                request.slot = self.free.pop(0)
                self.store.reset(request.slot)
                self.running.append(request)

    def _retire(self) -> None:
        for request in list(self.running):
            if request.cancelled and not request.done:
                self._finish(request, "cancelled")
            if request.done:
                assert request.slot is not None
                with self.lock:
                    self.running.remove(request)
                    self.free.append(request.slot)
                    self.free.sort()  # lowest slots first keeps the running rows contiguous more often
                request.slot = None
                self._announce(request)

    def _forward(self, tokens_BS: torch.Tensor, requests: list[Request], starts: list[int],
                 logits_to_keep: int) -> torch.Tensor:
        slots_B = torch.tensor([r.slot for r in requests], dtype=torch.long, device=self.device)
        start_B = torch.tensor(starts, dtype=torch.long, device=self.device)
        out = self.model(tokens_BS.to(self.device), cache=self.store.view(slots_B, start_B),
                         logits_to_keep=logits_to_keep)
        if self.trace is not None:
            self.trace.record(out.routing, tokens_BS, sequence_B=torch.tensor([r.id for r in requests]),
                              start_B=start_B.cpu())
        if any(r.routing for r in requests):
            B, S = tokens_BS.shape
            for layer, decision in enumerate(out.routing):
                if decision is None:
                    continue
                ids_BSK = decision.expert_ids_TK.reshape(B, S, -1)
                for b, r in enumerate(requests):
                    if r.routing:
                        ids = ids_BSK[b].reshape(-1)
                        counts_E = torch.bincount(ids[ids >= 0], minlength=decision.num_experts).cpu()
                        r.routing_counts[layer] = r.routing_counts.get(layer, 0) + counts_E
        return out.logits[:, -1]

    def _prefill_chunk(self, requests: list[Request]) -> None:
        """One forward over the next L prompt tokens of each request: L is the shortest remainder,
        capped so that the forward holds at most max(prefill_chunk, len(requests)) tokens."""
        left = min(len(r.prompt_ids) - r.prefilled for r in requests)
        L = max(1, min(left, self.prefill_chunk // len(requests)))
        starts = [r.prefilled for r in requests]
        tokens_BS = torch.tensor([r.prompt_ids[lo:lo + L] for r, lo in zip(requests, starts)], dtype=torch.long)
        logits_BV = self._forward(tokens_BS, requests, starts, logits_to_keep=1)
        for b, request in enumerate(requests):
            request.prefilled += L
            if request.prefilled == len(request.prompt_ids):
                request.t_first = time.perf_counter()
                self._accept(request, sample(logits_BV[b], request.params, request._generator))

    def _decode(self, requests: list[Request]) -> None:
        tokens_B1 = torch.tensor([[r.output_ids[-1]] for r in requests], dtype=torch.long)
        starts = [len(r.prompt_ids) + len(r.output_ids) - 1 for r in requests]
        logits_BV = self._forward(tokens_B1, requests, starts, logits_to_keep=1)
        greedy_B = torch.argmax(logits_BV, dim=-1).tolist()
        for b, r in enumerate(requests):
            token = greedy_B[b] if r.params.greedy else sample(logits_BV[b], r.params, r._generator)
            self._accept(r, token)

    def _accept(self, request: Request, token: int) -> None:
        """Append a sampled token; finish on EOS, a stop string or the token limit; notify."""
        assert request._stream is not None
        request.output_ids.append(token)
        delta, reason = "", None
        if token in self.loaded.eos_ids and not request.params.ignore_eos:
            reason = "stop"
        else:
            delta = request._stream.push(token)
            if request._stream.stopped:
                reason = "stop"
            elif len(request.output_ids) >= request.params.max_new_tokens:
                reason = "length"
        request.text = request._stream.text[:request._stream.emitted]
        if reason is not None:
            self._finish(request, reason, delta)
        elif request.on_event is not None:
            request.on_event(request, delta)

    def _finish(self, request: Request, reason: str, delta: str = "") -> None:
        if request._stream is not None and reason not in ("cancelled", "error"):
            delta += request._stream.flush()
            request.text = request._stream.text
        request.finish_reason = reason
        request.t_done = time.perf_counter()
        request._last_delta = delta
        if request.slot is None:  # never admitted: nothing to free first
            self._announce(request)

    @staticmethod
    def _announce(request: Request) -> None:
        if request.on_event is not None:
            request.on_event(request, request._last_delta)
