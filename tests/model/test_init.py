"""One initialisation policy (moekit/model/init.py): what a freshly built decoder holds."""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.experts.grouped import Experts
from moekit.model import ModelConfig, MoETransformer
from moekit.model.init import INIT_STD
from moekit.routing.topk import TopKRouter
from moekit.train.run import build_model

MOE = MoEConfig(d_model=64, d_ff=64, num_experts=4, top_k=2, noisy_gating=True)
CFG = ModelConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, d_ff=64, moe=MOE)


def test_noise_gate_starts_at_zero_alone_and_inside_a_model() -> None:
    assert TopKRouter(MOE).noise_gate.weight.abs().max() == 0
    for model in (MoETransformer(CFG), build_model(CFG, seed=0)):
        gates = [layer.router.noise_gate.weight for layer in model.moe_layers()]
        assert len(gates) == 2 and all(g.abs().max() == 0 for g in gates)


def test_experts_and_linears_share_the_std_and_a_seed_fixes_every_value() -> None:
    model = build_model(CFG, seed=3)
    experts = model.moe_layers()[0].experts.w_up_EDF
    gate = model.moe_layers()[0].router.gate.weight
    for w in (experts, gate, model.model.embed_tokens.weight, model.lm_head.weight):
        assert abs(float(w.detach().std()) - INIT_STD) < 0.2 * INIT_STD
    again = build_model(CFG, seed=3)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    # A standalone expert bank keeps its own fan-in scaled init.
    alone = Experts(MOE).w_up_EDF.detach()
    assert abs(float(alone.std()) - 64 ** -0.5) < 0.2 * 64 ** -0.5
