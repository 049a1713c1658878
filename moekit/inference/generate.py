"""`moekit.generate`: one completion from a model directory (or a loaded model), streamed as it
is produced. It runs the batching engine with one slot, so a request alone and a request in a
batch take the same code path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.inference.engine import Engine, Request
from moekit.inference.load import LoadedModel, load
from moekit.inference.sampling import SamplingParams
from moekit.inference.trace_recorder import TraceRecorder


@dataclass(frozen=True)
class Generation:
    """A finished completion: its text, token ids (EOS included when it ended there), why it
    ended ("stop" or "length"), and timings: prompt_seconds (prefill up to the first token) and
    decode_seconds (the remaining tokens)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    prompt_seconds: float
    decode_seconds: float
    routing: dict[int, list[int]] | None = None

    @property
    def prompt_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prompt_seconds if self.prompt_seconds > 0 else float("inf")

    @property
    def generated_tokens_per_s(self) -> float:
        """Tokens after the first over the time they took (the first comes from the prefill)."""
        n = len(self.token_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


def prompt_ids(loaded: LoadedModel, prompt: str | list[int] | list[dict], *, chat: bool) -> list[int]:
    """Token ids of a prompt: text (through the chat template with `chat`), a list of messages (chat),
    or ids as they are."""
    tok = loaded.tokenizer
    if isinstance(prompt, list) and not prompt:
        return []  # the engine refuses it with a clear error
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if chat or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        # the template writes the special tokens it wants (e.g. the BOS), so none are added again
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, a list of token ids or a list of messages, not "
                        f"{prompt!r:.60}")
    return tok.encode(prompt)


def generate(
    model: str | Path | LoadedModel,
    prompt: str | list[int] | list[dict],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] | list[str] = (),
    chat: bool = False,
    dtype: torch.dtype | str | None = None,
    routing: bool = False,
    on_text: Callable[[str], None] | None = None,
    prefill_chunk: int = 512,
    trace: TraceRecorder | None = None,
) -> Generation:
    """Generate one completion.

    Args:
        model: a model directory (Hugging Face layout or a `moekit train` run), or
            `moekit.inference.load(...)`.
        prompt: text, token ids, or chat messages [{"role": ..., "content": ...}].
        temperature: 0 is greedy; top_p, top_k filter the distribution; seed makes sampling reproducible.
        stop: strings that end the completion (cut from its text). EOS ends it too.
        chat: render a text prompt as one user message through the model's chat template.
        dtype: load dtype when `model` is a path.
        routing: also return per MoE layer the count of this request's tokens per expert.
        on_text: called with each piece of text as soon as it is final (streaming).
        trace: a `TraceRecorder` that records the routing of every forward (`trace.save(path)`).
    """
    loaded = model if isinstance(model, LoadedModel) else load(model, dtype=dtype)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=tuple(stop))
    ids = prompt_ids(loaded, prompt, chat=chat)
    engine = Engine(loaded, max_batch_size=1, max_len=min(loaded.context_length, len(ids) + max_new_tokens),
                    prefill_chunk=prefill_chunk, trace=trace)
    request = Request(prompt_ids=ids, params=params, routing=routing,
                      on_event=(lambda _r, delta: on_text(delta) if delta else None) if on_text else None)
    engine.submit(request)
    while not request.done:
        engine.step()
    if request.finish_reason == "error":
        raise RuntimeError(f"generation failed: {request.error}")
    assert request.t_first is not None and request.t_done is not None
    return Generation(
        text=request.text, token_ids=request.output_ids, prompt_ids=ids,
        finish_reason=request.finish_reason or "",
        prompt_seconds=request.t_first - request.t_submit, decode_seconds=request.t_done - request.t_first,
        routing={k: v.tolist() for k, v in request.routing_counts.items()} if routing else None)
