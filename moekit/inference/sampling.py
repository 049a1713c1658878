"""Sampling settings and the next-token choice: greedy at temperature 0, else temperature, top-k
and top-p (nucleus) filtering and one draw from a per-request seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import check


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_new_tokens: generated tokens at most (the EOS token counts).
        temperature: 0 is greedy (argmax; ties go to the lower id); otherwise logits / temperature.
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 keeps all).
        top_k: keep the k most likely tokens (0 keeps all).
        seed: seeds this request's generator, so a sampled completion is reproducible; None draws one.
        stop: strings that end the completion (not included in its text).
        ignore_eos: keep going past the EOS token (benchmarks).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        check(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
              and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        check(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
              and math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
              "must be a number >= 0 (0 is greedy)")
        check(isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool)
              and 0 < self.top_p <= 1, "top_p", self.top_p, "must be a number in (0, 1]")
        check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0, "top_k",
              self.top_k, "must be an integer >= 0 (0 keeps every token)")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)), "seed",
              self.seed, "must be an integer or None")
        check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
              self.stop, "must be a tuple of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_V: Tensor, *, temperature: float, top_k: int, top_p: float) -> Tensor:
    """fp32 logits / temperature with the tokens top-k and top-p exclude set to -inf."""
    logits_V = logits_V.float() / temperature
    V = logits_V.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        probs_V = sorted_V.softmax(-1)
        # drop a token when the ones before it already reach top_p (the first always stays)
        drop_V = (probs_V.cumsum(-1) - probs_V) >= top_p
        logits_V = logits_V.masked_fill(drop_V.scatter(0, order_V, drop_V), float("-inf"))
    return logits_V


def sample(logits_V: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one sequence from its last logits (V,)."""
    if params.greedy:
        return int(torch.argmax(logits_V))
    probs_V = filter_logits(logits_V, temperature=params.temperature, top_k=params.top_k,
                            top_p=params.top_p).softmax(-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))
