"""Hash router: table lookup vs reference, fixed seeded tables, balanced fitting, token-id errors."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.routing.hash import HashRouter
from tests.reference.routers import reference_balanced_table, reference_hash, reference_round_robin


def make_router(V: int = 20, E: int = 4, k: int = 1, table: str = "random") -> HashRouter:
    return HashRouter(MoEConfig(d_model=4, d_ff=4, num_experts=E, top_k=k, router="hash",
                                hash_vocab_size=V, hash_table=table))


TABLES = [
    pytest.param(20, 4, 1, "random", id="random-k1"),
    pytest.param(20, 4, 2, "random", id="random-k2"),
    pytest.param(30, 8, 1, "random", id="random-E8"),
    pytest.param(9, 4, 1, "balanced", id="round-robin-k1"),
    pytest.param(9, 5, 3, "balanced", id="round-robin-k3"),
]


@pytest.mark.parametrize("V,E,k,table", TABLES)
def test_route_matches_table_lookup_reference(V, E, k, table) -> None:
    router = make_router(V, E, k, table)
    torch.manual_seed(0)
    token_ids_T = torch.randint(0, V, (13,))
    d = router(torch.randn(13, 4), token_ids_T=token_ids_T)
    ref_ids, ref_w = reference_hash(token_ids_T.tolist(), router.table_VK.tolist())
    assert torch.equal(d.expert_ids_TK, ref_ids)
    assert torch.equal(d.weights_TK, ref_w)
    assert torch.equal(d.counts_E, torch.bincount(ref_ids.reshape(-1), minlength=E))
    assert (d.logits_TE == 0).all() and torch.allclose(d.probs_TE, torch.full((13, E), 1 / E))
    # A token's K experts differ, and every table entry is a valid expert.
    assert all(len(set(row)) == k for row in router.table_VK.tolist())
    assert router.table_VK.min() >= 0 and router.table_VK.max() < E


def test_round_robin_before_fitting() -> None:
    router = make_router(11, 4, 3, "balanced")
    assert router.table_VK.tolist() == reference_round_robin(11, 4, 3)


def test_random_table_is_fixed_by_the_config_and_saved_with_the_model() -> None:
    a, b = make_router(50, 8, 2), make_router(50, 8, 2)
    assert torch.equal(a.table_VK, b.table_VK)
    assert len({tuple(r) for r in a.table_VK.tolist()}) > 10  # not a constant table
    assert torch.equal(a.state_dict()["table_VK"], a.table_VK)


@pytest.mark.parametrize("E,k", [pytest.param(4, 1, id="k1"), pytest.param(5, 2, id="k2"),
                                  pytest.param(3, 3, id="k-equals-E")])
def test_fit_balanced_matches_greedy_reference(E, k) -> None:
    torch.manual_seed(E)
    counts_V = torch.randint(0, 50, (40,))
    counts_V[3] = counts_V[7] = 1000  # ties between frequent tokens: lower id first
    router = make_router(40, E, k, "balanced")
    router.fit_balanced(counts_V)
    assert router.table_VK.tolist() == reference_balanced_table(counts_V.tolist(), E, k)


def test_fit_balanced_by_hand_and_it_balances_a_zipf_vocabulary() -> None:
    router = make_router(5, 2, 1, "balanced")
    router.fit_balanced(torch.tensor([1, 10, 4, 5, 3]))
    # By frequency: token 1 (10) -> e0; 3 (5) -> e1; 2 (4) -> e1 (load 5 < 10); 4 (3) -> e1 (9 < 10);
    # 0 (1) -> e0 (10 < 12).
    assert router.table_VK[:, 0].tolist() == [0, 0, 1, 1, 1]
    zipf_V = (1000 / torch.arange(1, 201)).long()
    big = make_router(200, 4, 1, "balanced")  # the top token (1000) is below the mean load (~1470)
    big.fit_balanced(zipf_V)
    load_E = torch.zeros(4).index_add_(0, big.table_VK[:, 0], zipf_V.float())
    rr_load_E = torch.zeros(4).index_add_(0, torch.arange(200) % 4, zipf_V.float())
    assert load_E.max() / load_E.mean() < 1.05 < rr_load_E.max() / rr_load_E.mean()


def test_fit_balanced_bad_input() -> None:
    with pytest.raises(ValueError, match="hash_table='balanced'"):
        make_router(10, 4, 1, "random").fit_balanced(torch.ones(10))
    router = make_router(10, 4, 1, "balanced")
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        router.fit_balanced(torch.ones(9))
    with pytest.raises(ValueError, match="non-negative"):
        router.fit_balanced(-torch.ones(10))


def test_missing_or_bad_token_ids_raise() -> None:
    layer = MoELayer(MoEConfig(d_model=4, d_ff=4, num_experts=4, router="hash", hash_vocab_size=10))
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="pass token_ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"\[0, hash_vocab_size=10\)"):
        layer(x, token_ids=torch.tensor([[1, 2, 10], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"\[0, hash_vocab_size=10\)"):
        layer(x, token_ids=torch.tensor([[1, 2, -1], [0, 0, 0]]))
    with pytest.raises(TypeError, match="integer"):
        layer(x, token_ids=torch.zeros(2, 3))


def test_padding_may_hold_any_id_and_goes_nowhere() -> None:
    layer = MoELayer(MoEConfig(d_model=4, d_ff=4, num_experts=4, router="hash", hash_vocab_size=10))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = layer(torch.randn(2, 3, 4), token_ids=torch.tensor([[1, 2, -100], [3, 99, -1]]), mask=mask)
    assert (out.decision.expert_ids_TK[~mask.reshape(-1)] == -1).all()
    assert int(out.decision.counts_E.sum()) == 2 * 3  # 3 real tokens, top_k = 2


def test_config_needs_vocab_size_and_has_no_gate_bias() -> None:
    with pytest.raises(ValueError, match="hash_vocab_size"):
        MoEConfig(d_model=4, d_ff=4, num_experts=4, router="hash")
    with pytest.raises(ValueError, match="router_bias"):
        MoEConfig(d_model=4, d_ff=4, num_experts=4, router="hash", hash_vocab_size=8, router_bias=True)
