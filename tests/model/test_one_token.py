"""The bound one-token decode step (`moekit.model.one_token`) against the model's module path: the
same logits bit for bit, the same routing and the same cache, token after token, for every option
it covers; the module path whenever it cannot run (unsupported models, hooks, recording routers,
moved or cast weights, no kernels)."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit.model.transformer as transformer
from moekit.config import MoEConfig
from moekit.kernels import cpu
from moekit.model import one_token
from moekit.model.cache import SlotStore
from moekit.model.config import ModelConfig, RopeConfig
from moekit.model.transformer import MoETransformer

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the kernels are not built")

D = 32


def _model(dtype: torch.dtype = torch.float32, moe: dict | None = None, **kw) -> MoETransformer:
    torch.manual_seed(0)
    moe_cfg = MoEConfig(d_model=D, d_ff=24, num_experts=6, top_k=2, **(moe or {}))
    cfg = ModelConfig(**{**dict(vocab_size=50, d_model=D, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=40,
                                moe=moe_cfg, max_seq_len=64), **kw})
    model = MoETransformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype)


def _decode(model: MoETransformer, steps: int, *, fast: bool, monkeypatch, slot: int = 1):
    """Prefill 5 tokens by the module path, then `steps` single tokens (one-token step or modules)."""
    store = SlotStore(model.config.n_layers, 3, 40)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=g)
    outs = []
    with monkeypatch.context() as m, torch.inference_mode():
        if not fast:
            m.setattr(transformer, "step_for", lambda model: None)
        out = model(prompt, cache=store.view(torch.tensor([slot]), torch.tensor([0])), logits_to_keep=1)
        for i in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(token, cache=store.view(torch.tensor([slot]), torch.tensor([5 + i])), logits_to_keep=1)
            outs.append(out)
    return outs, store


def _assert_same(model: MoETransformer, monkeypatch, steps: int = 6) -> None:
    assert one_token.unsupported(model) is None
    fast, fast_store = _decode(model, steps, fast=True, monkeypatch=monkeypatch)
    slow, slow_store = _decode(model, steps, fast=False, monkeypatch=monkeypatch)
    for a, b in zip(fast, slow):
        assert a.logits.shape == b.logits.shape == (1, 1, model.config.vocab_size)
        assert torch.equal(a.logits, b.logits)
        assert len(a.routing) == len(b.routing)
        for x, y in zip(a.routing, b.routing):
            assert (x is None) == (y is None)
            if x is not None:
                for field in ("expert_ids_TK", "weights_TK", "logits_TE", "probs_TE", "counts_E"):
                    assert torch.equal(getattr(x, field), getattr(y, field)), field
    assert fast_store.buffers.keys() == slow_store.buffers.keys()
    for key in fast_store.buffers:
        assert torch.equal(fast_store.buffers[key], slow_store.buffers[key]), key


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    pytest.param({}, id="mixtral-like"),
    pytest.param(dict(qk_norm="head", qkv_bias=True, o_bias=True, moe_layers=(0, 2)), id="qwen-like-dense-layer"),
    pytest.param(dict(moe=dict(num_shared_experts=1, shared_expert_gate=True)), id="gated-shared-expert"),
    pytest.param(dict(moe=dict(score_func="sigmoid", expert_bias=True, normalize_topk=True,
                               routed_scaling_factor=2.5)), id="sigmoid-router-bias"),
    pytest.param(dict(moe=dict(softmax_after_topk=True, activation="gelu", expert_mlp_bias=True)),
                 id="softmax-after-topk-plain-experts"),
    pytest.param(dict(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0, tie_embeddings=True,
                      lm_head_bias=False, attn_scale=0.2), id="multipliers-tied"),
    pytest.param(dict(rope=None), id="no-rope"),
    pytest.param(dict(rope=RopeConfig(scaling="dynamic", factor=2.0)), id="dynamic-rope"),
    pytest.param(dict(rope=RopeConfig(scaling="yarn", factor=4.0, original_max_position=16, partial_rotary=0.5)),
                 id="yarn-partial-rotary"),
    pytest.param(dict(n_kv_heads=4, lm_head_bias=True), id="mha-head-bias"),
])
def test_one_token_step_equals_the_module_path(dtype, options, monkeypatch):
    options = dict(options)
    moe = options.pop("moe", None)
    _assert_same(_model(dtype, moe, **options), monkeypatch)


def test_expert_bias_changes_are_seen_and_a_cast_rebuilds(monkeypatch):
    model = _model(moe=dict(expert_bias=True))
    _assert_same(model, monkeypatch, steps=2)
    with torch.no_grad():  # in place: the same addresses, new values
        for layer in model.moe_layers():
            layer.router.expert_bias.copy_(torch.linspace(-1, 1, 6))
    _assert_same(model, monkeypatch, steps=2)
    model.to(torch.bfloat16)  # new tensors: the bound addresses are stale, the step is rebuilt
    _assert_same(model, monkeypatch, steps=2)


@pytest.mark.parametrize("change", ["window", "qk_full", "capacity", "groups", "post_norms", "nope", "training"])
def test_unsupported_models_name_the_reason_and_run_their_modules(change, monkeypatch):
    kw: dict = {"window": dict(sliding_window=3), "qk_full": dict(qk_norm="full"),
                "post_norms": dict(post_norms=True), "nope": dict(nope_layers=(1,))}.get(change, {})
    moe = {"capacity": dict(capacity_factor=1.0), "groups": dict(num_groups=3, topk_groups=1)}.get(change)
    model = _model(moe=moe, **kw)
    if change == "training":
        model.train()
    reason = one_token.unsupported(model)
    assert isinstance(reason, str) and reason
    assert one_token.step_for(model) is None
    if change != "training":
        fast, _ = _decode(model, 2, fast=True, monkeypatch=monkeypatch)
        slow, _ = _decode(model, 2, fast=False, monkeypatch=monkeypatch)
        assert all(torch.equal(a.logits, b.logits) for a, b in zip(fast, slow))


def test_hooks_and_recording_routers_take_the_module_path(monkeypatch):
    model = _model()
    assert one_token.step_for(model) is not None
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda *args: seen.append(1))
    assert one_token.step_for(model) is None
    _decode(model, 2, fast=True, monkeypatch=monkeypatch)
    assert len(seen) == 3  # the prefill and both tokens ran the hooked layer
    handle.remove()
    router = model.moe_layers()[0].router
    router.recording = []
    assert one_token.step_for(model) is None
    _decode(model, 2, fast=True, monkeypatch=monkeypatch)
    assert len(router.recording) == 3
    router.recording = None
    assert one_token.step_for(model) is not None


def test_beyond_the_cache_is_refused_like_the_module_path():
    model = _model()
    store = SlotStore(model.config.n_layers, 1, 6)
    with torch.inference_mode():
        model(torch.zeros(1, 6, dtype=torch.long), cache=store.view(torch.tensor([0]), torch.tensor([0])))
        with pytest.raises(ValueError, match="beyond the cache's max_len 6"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=store.view(torch.tensor([0]), torch.tensor([6])))


def test_a_copied_model_gets_its_own_step(monkeypatch):
    model = _model()
    _decode(model, 1, fast=True, monkeypatch=monkeypatch)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    assert one_token.step_for(twin) is not one_token.step_for(model)
    fast, _ = _decode(twin, 2, fast=True, monkeypatch=monkeypatch)
    slow, _ = _decode(twin, 2, fast=False, monkeypatch=monkeypatch)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(fast, slow))


def test_without_kernels_there_is_no_step(monkeypatch):
    monkeypatch.setattr(cpu, "available", lambda: False)
    assert "not built" in one_token.unsupported(_model())


def test_a_replaced_module_rebuilds_the_step(monkeypatch):
    from moekit.experts.dense import DenseMLP

    model = _model()
    first = one_token.step_for(model)
    assert first is not None
    model.model.layers[2].mlp = DenseMLP(D, 40, "swiglu")  # a child replaced: the bound layer is stale
    second = one_token.step_for(model)
    assert second is not None and second is not first
    _assert_same(model, monkeypatch, steps=2)
