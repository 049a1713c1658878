"""Byte-level BPE on the fixture, sequence packing, and the (seed, step) -> batch order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moekit.train.batches import PackedSequences, batch_indices, encode_documents
from moekit.train.data import Document, load_corpus
from moekit.train.tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare_mini"


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(FIXTURE)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([d.text for d in corpus.train], vocab_size=400)


def test_bpe_round_trips_any_text_and_respects_vocab_size(tokenizer, corpus):
    assert tokenizer.get_vocab_size() <= 400
    assert tokenizer.token_to_id(EOS_TOKEN) == 0
    for text in (corpus.val[0].text, "Zoë’s naïve café — 日本語 🙂\n"):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # Merges were learned: training text compresses below one token per byte.
    text = corpus.train[0].text
    assert len(tokenizer.encode(text).ids) < 0.7 * len(text.encode())


def test_training_is_deterministic_and_saves_beside_the_model(tokenizer, corpus, tmp_path):
    again = train_tokenizer([d.text for d in corpus.train], vocab_size=400)
    assert again.to_str() == tokenizer.to_str()
    path = save_tokenizer(tokenizer, tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert load_tokenizer(tmp_path).to_str() == tokenizer.to_str()


@pytest.mark.parametrize("vocab_size", [pytest.param(256, id="below-bytes"), pytest.param("1k", id="str")])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=vocab_size)


def test_documents_are_joined_with_end_of_text(tokenizer):
    docs = [Document("a", "hello there"), Document("b", "general")]
    ids = encode_documents(tokenizer, docs).tolist()
    first = tokenizer.encode("hello there").ids
    assert ids == first + [0] + tokenizer.encode("general").ids + [0]


def test_packed_batch_is_windows_with_shifted_targets():
    packed = PackedSequences(tokens_N=torch.arange(100, 123, dtype=torch.int32), seq_len=5)
    assert packed.num_sequences == 4  # (23 - 1) // 5
    inputs_BS, targets_BS = packed.batch(torch.tensor([3, 0]))
    assert inputs_BS.tolist() == [[115, 116, 117, 118, 119], [100, 101, 102, 103, 104]]
    assert targets_BS.tolist() == [[116, 117, 118, 119, 120], [101, 102, 103, 104, 105]]
    assert inputs_BS.dtype == torch.long


def test_too_short_stream_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedSequences(tokens_N=torch.arange(4), seq_len=8)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    rng_before = torch.get_rng_state()
    a = [batch_indices(s, seed=3, batch_size=4, num_sequences=10) for s in range(5)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    b = [batch_indices(s, seed=3, batch_size=4, num_sequences=10) for s in reversed(range(5))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # 5 steps x 4 = 20 positions = exactly two epochs: each sequence seen once per epoch.
    flat = torch.cat(a)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])  # a new permutation each epoch
    other = torch.cat([batch_indices(s, seed=4, batch_size=4, num_sequences=10) for s in range(5)])
    assert not torch.equal(flat, other)
