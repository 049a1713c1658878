"""MMoE against its baselines by construction, gate properties, and AUC on hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.multitask.model import MultiTaskConfig, MultiTaskModel, gate_weights
from moekit.multitask.train import roc_auc

CARDS = (5, 3, 7)


def rows(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], dim=1)
    return cat, torch.randn(n, 4, generator=g)


def config(kind: str, **kw) -> MultiTaskConfig:
    return MultiTaskConfig(**{**dict(kind=kind, cardinalities=CARDS, num_numeric=4, embed_dim=3,
                                     num_experts=4, expert_dim=6, tower_dim=5), **kw})


def test_one_expert_mmoe_equals_shared_bottom() -> None:
    torch.manual_seed(0)
    mmoe = MultiTaskModel(config("mmoe", num_experts=1))
    shared = MultiTaskModel(config("shared_bottom", num_experts=1, bottom_dim=6))
    shared.input.load_state_dict(mmoe.input.state_dict())
    shared.towers.load_state_dict(mmoe.towers.state_dict())
    with torch.no_grad():
        mmoe.experts.b_EH.normal_()
        shared.bottom[0].weight.copy_(mmoe.experts.w_EIH[0].t())
        shared.bottom[0].bias.copy_(mmoe.experts.b_EH[0])
    cat, num = rows()
    out_m, out_s = mmoe(cat, num), shared(cat, num)
    torch.testing.assert_close(out_m.logits_NT, out_s.logits_NT, rtol=1e-5, atol=1e-6)
    out_m.logits_NT.sum().backward()
    out_s.logits_NT.sum().backward()
    torch.testing.assert_close(mmoe.experts.w_EIH.grad[0], shared.bottom[0].weight.grad.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mmoe.input.embeddings[1].weight.grad, shared.input.embeddings[1].weight.grad)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_identical_gates_equal_the_one_gate_model(top_k: int | None) -> None:
    torch.manual_seed(0)
    mmoe = MultiTaskModel(config("mmoe", gate_top_k=top_k))
    one = MultiTaskModel(config("one_gate", gate_top_k=top_k))
    state = {k: v for k, v in mmoe.state_dict().items() if not k.startswith("gates.")}
    one.load_state_dict({**state, **{k: v for k, v in one.state_dict().items() if k.startswith("gates.")}})
    mmoe.gates[1].load_state_dict(one.gates[0].state_dict())
    mmoe.gates[0].load_state_dict(one.gates[0].state_dict())
    cat, num = rows()
    torch.testing.assert_close(mmoe(cat, num).logits_NT, one(cat, num).logits_NT)


@pytest.mark.parametrize("top_k", [None, 1, 3], ids=["dense", "top1", "top3"])
def test_each_task_gate_sums_to_one(top_k: int | None) -> None:
    torch.manual_seed(1)
    out = MultiTaskModel(config("mmoe", gate_top_k=top_k, num_tasks=3))(*rows())
    assert len(out.gates) == 3
    for g_NE in out.gates:
        torch.testing.assert_close(g_NE.sum(-1), torch.ones(32))
        assert (g_NE >= 0).all()
        if top_k is not None:
            assert ((g_NE > 0).sum(-1) == top_k).all()
    assert not torch.allclose(out.gates[0], out.gates[1])  # separate gates


def test_topk_gate_by_hand() -> None:
    g = gate_weights(torch.tensor([[0.0, 2.0, 1.0, 2.0]]), top_k=2)
    # experts 1 and 3 tie at the top: softmax over (2, 2) -> 0.5 each
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.5, 0.0, 0.5]]))


def test_auc_hand_computed() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs ordered right
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2: (0.5 + 1 + 1 + 1) / 4
    assert roc_auc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 0, 1])) == pytest.approx(0.875)
    assert roc_auc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0


def test_auc_equals_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 6, 200).astype(float), rng.integers(0, 2, 200)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    assert roc_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="kind"):
        config("ple")
    with pytest.raises(ValueError, match="gate_top_k"):
        config("mmoe", gate_top_k=9)
