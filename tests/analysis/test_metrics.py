"""Specialization metrics against hand-computed values on hand-made routing tables."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.analysis import metrics as m


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


# ---- load, drops, entropy ----------------------------------------------------------------------
def test_load_counts_skip_no_expert_slots():
    ids = t([[0, -1], [1, -1], [0, 1]])
    assert m.load_counts(ids, 3).tolist() == [2, 2, 0]
    assert m.mean_slots(ids) == pytest.approx(4 / 3)


def test_max_vio_and_its_uniform_baseline():
    stats = m.load_stats(t([[0], [0], [0], [1]]), 2)
    assert stats["tokens_per_expert"] == [3, 1]
    assert stats["load_fraction"] == [0.75, 0.25]
    assert stats["max_vio"] == pytest.approx(0.5)  # 3 / 2 - 1
    # random routing of many tokens is nearly balanced, but not exactly
    big = m.load_stats(t([[0, 1]] * 20000), 8)
    assert big["max_vio"] == pytest.approx(3.0)  # two of eight experts take everything
    assert 0.0 < big["max_vio_uniform"] < 0.05


def test_dropped_fraction():
    assert m.dropped_fraction(t([[0], [-1], [1], [-1]]), t([[0], [1], [1], [-1]])) == pytest.approx(1 / 3)
    assert m.dropped_fraction(t([[0]]), None) == 0.0


def test_entropy_stats():
    s = m.entropy_stats(torch.tensor([math.log(4), 0.0]), 4)
    assert s["router_entropy"] == pytest.approx(math.log(4) / 2)
    assert s["router_entropy_normalized"] == pytest.approx(0.5)
    assert s["router_entropy_uniform"] == pytest.approx(math.log(4))


# ---- domains -----------------------------------------------------------------------------------
def test_perfect_domain_specialization_gives_one():
    ids = t([[0], [0], [2], [2], [2]])
    labels = t([0, 0, 1, 1, 1])
    s = m.domain_specialization(ids, labels, num_experts=4, num_domains=2)
    assert s["share"] == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    assert s["tokens_per_domain"] == [2, 3]
    assert s["mean_max_share"] == 1.0
    assert s["uniform"] == 0.25


def test_chance_routing_gives_k_over_e():
    ids = t([[0, 1], [2, 3]] * 4)                 # every domain meets every expert equally often
    labels = t([0, 0, 1, 1, 0, 0, 1, 1])
    s = m.domain_specialization(ids, labels, num_experts=4, num_domains=2)
    assert s["share"] == [[0.5] * 4, [0.5] * 4]
    assert s["mean_max_share"] == pytest.approx(s["uniform"]) == pytest.approx(2 / 4)


def test_shuffled_labels_destroy_specialization():
    seqs = torch.arange(200).repeat_interleave(10)
    labels = seqs % 2
    ids = torch.where(labels == 0, 0, 2)[:, None]
    s = m.domain_specialization(ids, labels, num_experts=4, num_domains=2, sequence_N=seqs)
    assert s["mean_max_share"] == 1.0
    assert s["mean_max_share_shuffled"] < 0.7
    # sequence-level shuffle: each sequence keeps one label
    shuffled = m.shuffle_labels(labels, seqs, seed=1)
    assert all(len(set(shuffled[seqs == q].tolist())) == 1 for q in range(200))
    assert sorted(shuffled.tolist()) == sorted(labels.tolist())


def test_domain_share_with_no_expert_slots():
    ids = t([[0, -1], [0, 1]])
    s = m.domain_specialization(ids, t([0, 0]), num_experts=2, num_domains=1)
    assert s["share"] == [[1.0, 0.5]]
    assert s["uniform"] == pytest.approx(1.5 / 2)


# ---- vocabulary --------------------------------------------------------------------------------
def test_vocabulary_specialization_hand_computed():
    ids = t([[0], [0], [1], [2], [2]])
    tokens = t([5, 5, 5, 7, 7])
    s = m.vocabulary_specialization(ids, tokens, num_experts=3)
    assert s["score"] == pytest.approx((2 + 2) / 5)  # id 5: 2 of 3 at expert 0; id 7: 2 of 2 at 2
    assert s["uniform"] == pytest.approx(1 / 3)
    assert s["top_tokens"][0] == [[5, pytest.approx(2 / 3), 3]]
    assert s["top_tokens"][1] == [[5, pytest.approx(1 / 3), 3]]
    assert s["top_tokens"][2] == [[7, 1.0, 2]]
    assert m.vocabulary_specialization(ids, tokens, num_experts=3, min_count=3)["score"] == pytest.approx(2 / 3)


def test_vocabulary_hash_routing_is_fully_specialized_and_shuffle_is_not():
    tokens = torch.arange(16).repeat(50)
    ids = (tokens % 4)[:, None]
    s = m.vocabulary_specialization(ids, tokens, num_experts=4)
    assert s["score"] == 1.0
    assert s["score_shuffled"] < 0.5


def test_vocabulary_chance_gives_k_over_e():
    tokens = t([3] * 8)
    ids = t([[0, 1], [2, 3]] * 4)
    assert m.vocabulary_specialization(ids, tokens, num_experts=4)["score"] == pytest.approx(2 / 4)


# ---- co-activation -----------------------------------------------------------------------------
def test_coactivation_hand_computed():
    ids = t([[0, 1], [0, 2], [0, 1], [1, 2]])
    p = m.coactivation(ids, num_experts=3)
    expected = torch.tensor([[0, 2 / 3, 1 / 3], [2 / 3, 0, 1 / 3], [1 / 2, 1 / 2, 0]])
    torch.testing.assert_close(p, expected)
    s = m.coactivation_stats(ids, num_experts=3)
    assert s["uniform"] == pytest.approx(0.5)
    assert s["mean_max"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)


def test_coactivation_ignores_no_expert_slots_and_unused_experts():
    p = m.coactivation(t([[0, -1], [0, 1]]), num_experts=3)
    assert p.tolist() == [[0, 0.5, 0], [1.0, 0, 0], [0, 0, 0]]


# ---- locality ----------------------------------------------------------------------------------
def test_constant_router_has_locality_one():
    N = 12
    s = m.locality(t([[3, 1]] * N), torch.arange(N) // 4, torch.arange(N) % 4, num_experts=4)
    assert s["pairs"] == 9
    assert s["same_first"] == 1.0 and s["share_any"] == 1.0
    assert s["same_first_uniform"] == 0.25
    assert s["share_any_uniform"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert s["same_first_load"] == 1.0


def test_locality_counts_only_pairs_within_a_sequence_in_position_order():
    ids = t([[0], [0], [1], [1]])
    s = m.locality(ids, t([0, 0, 1, 1]), t([0, 1, 0, 1]), num_experts=2)
    assert s["pairs"] == 2 and s["same_first"] == 1.0      # the 0 -> 1 switch is across sequences
    one_seq = m.locality(ids, t([0, 0, 0, 0]), t([0, 1, 2, 3]), num_experts=2)
    assert one_seq["same_first"] == pytest.approx(2 / 3)
    perm = t([2, 0, 3, 1])                                  # rows in any order: same answer
    shuffled = m.locality(ids[perm], t([0, 0, 0, 0])[perm], t([0, 1, 2, 3])[perm], num_experts=2)
    assert shuffled["same_first"] == pytest.approx(2 / 3)
    assert shuffled["same_first_load"] == pytest.approx(0.5)


def test_lru_hit_rate_hand_computed():
    ids = t([[0], [1], [0], [0], [2], [0]])
    seq, pos = t([0] * 6), torch.arange(6)
    assert m.lru_hit_rate(ids, seq, pos, capacity=1) == pytest.approx(1 / 6)
    assert m.lru_hit_rate(ids, seq, pos, capacity=2) == pytest.approx(3 / 6)
    # the cache starts empty for each sequence
    assert m.lru_hit_rate(t([[0], [0], [0], [0]]), t([0, 0, 1, 1]), t([0, 1, 0, 1]), capacity=1) == 0.5
    assert m.lru_hit_rate(t([[0, -1], [0, -1]]), t([0, 0]), t([0, 1]), capacity=1) == 0.5
    with pytest.raises(ValueError, match="capacity=0"):
        m.lru_hit_rate(ids, seq, pos, capacity=0)


def test_cache_stats_baselines():
    N = 400
    ids = (torch.arange(N) // 20 % 4)[:, None]               # runs of 20 tokens on one expert
    rows = m.cache_stats(ids, torch.zeros(N, dtype=torch.long), torch.arange(N), num_experts=4,
                         capacities=(1, 2))
    assert rows[0]["lru_hit_rate"] == pytest.approx(1 - 20 / 400)
    assert rows[0]["lru_hit_rate_shuffled"] < 0.4
    assert [r["uniform"] for r in rows] == [pytest.approx(0.25, abs=0.06), pytest.approx(0.5, abs=0.06)]


# ---- saturation --------------------------------------------------------------------------------
def test_topk_overlap():
    assert m.topk_overlap(t([[0, 1], [2, 3]]), t([[1, 0], [2, 1]]), num_experts=4) == pytest.approx(0.75)
    assert m.topk_overlap(t([[0, 1]]), t([[0, 1]]), num_experts=4) == 1.0
    with pytest.raises(ValueError, match="same tokens"):
        m.topk_overlap(t([[0]]), t([[0], [1]]), num_experts=2)
