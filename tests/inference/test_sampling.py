"""Sampling filters against plain references, and incremental detokenization with stop strings."""

from __future__ import annotations

import pytest
import torch

from moekit.inference.sampling import SamplingParams, filter_logits
from moekit.inference.text import TextStream
from moekit.inference.tokenizer import TextTokenizer
from moekit.train.tokenizer import train_tokenizer


def _nucleus_reference(logits_V: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p, by a plain loop."""
    probs = logits_V.softmax(-1).tolist()
    kept, total = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if total >= top_p:
            break
        kept.add(i)
        total += probs[i]
    return kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, 5])
def test_filters_match_references(seed, top_p, top_k):
    logits_V = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 3
    kept = set(torch.isfinite(filter_logits(logits_V, temperature=1.0, top_k=top_k, top_p=top_p)).nonzero()
               .flatten().tolist())
    pool = logits_V.clone()
    if top_k:
        pool[pool < pool.topk(top_k).values[-1]] = float("-inf")
    assert kept == (_nucleus_reference(pool, top_p) if top_p < 1 else set(torch.isfinite(pool).nonzero()
                                                                          .flatten().tolist()))


def test_params_validate():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0), dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    tok = TextTokenizer(train_tokenizer(["héllo wörld, the end. " * 5], vocab_size=300))
    text = "héllo wörld, the end."
    ids = tok.encode(text)
    pieces, stream = [], TextStream(tok, stop=("the end",))
    for i in ids:
        pieces.append(stream.push(i))
        assert "\ufffd" not in pieces[-1]
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == "héllo wörld, "
    # byte by byte: a character split over tokens comes out whole
    bytes_only = TextTokenizer(train_tokenizer(["x"], vocab_size=257))
    stream = TextStream(bytes_only)
    out = [stream.push(i) for i in bytes_only.encode("é!")]
    assert out == ["", "é", "!"]
