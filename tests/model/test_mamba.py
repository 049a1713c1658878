"""Mamba mixer: fast chunked scan vs slow reference, step-by-step decode vs full forward,
transformers' JambaMambaMixer parity, parameter count, gradients and config errors."""

from __future__ import annotations

import pytest
import torch

from moekit.model.accounting import num_params
from moekit.model.mamba import MambaCache, MambaConfig, MambaMixer, selective_scan, ssm_step
from tests.reference.mamba import mamba_reference


def randomize(mixer: MambaMixer, seed: int = 0) -> MambaMixer:
    """Perturb every parameter (norm weights, D, A_log too) so no term hides behind an init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("layernorm.weight") or name == "D":
                p.copy_(1.0 + 0.3 * noise)
            elif name == "A_log":
                p.add_(0.2 * noise)
            else:
                p.copy_(0.4 * noise)
    return mixer


def make(seed: int = 0, **kw) -> MambaMixer:
    torch.manual_seed(seed)
    return randomize(MambaMixer(MambaConfig(**kw)), seed).double()


CONFIGS = [
    pytest.param(dict(d_model=8, d_state=4, d_conv=4, expand=2, chunk_size=4), 2, 7, id="jamba-chunk4-S7"),
    pytest.param(dict(d_model=8, d_state=3, d_conv=2, expand=1, dt_rank=2, chunk_size=16), 1, 5,
                 id="one-chunk"),
    pytest.param(dict(d_model=6, d_state=2, d_conv=3, expand=2, chunk_size=1, dt_layernorm=False,
                      bias=True, conv_bias=False), 2, 4, id="plain-mamba-chunk1-bias"),
    pytest.param(dict(d_model=8, d_state=4, d_conv=1, chunk_size=3), 3, 6, id="conv-width-1"),
    pytest.param(dict(d_model=8, d_state=4, chunk_size=4), 2, 1, id="single-token"),
    pytest.param(dict(d_model=8, d_state=4, d_conv=3), 2, 6, id="sequential-scan"),
]


@pytest.mark.parametrize("kw,B,S", CONFIGS)
def test_forward_and_gradients_match_reference(kw, B, S):
    mixer = make(**kw)
    x = torch.randn(B, S, kw["d_model"], dtype=torch.float64, requires_grad=True)
    cache = mixer.new_cache(B)
    y = mixer(x, cache=cache)
    y_ref, h_ref = mamba_reference(mixer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cache.ssm_state_BIN.double(), h_ref, rtol=1e-9, atol=1e-9)

    grad_out = torch.randn_like(y)
    params = [x] + list(mixer.parameters())
    grads = torch.autograd.grad((y * grad_out).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * grad_out).sum(), params)
    for (name, _), g, g_ref in zip([("x", x)] + list(mixer.named_parameters()), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9, msg=f"gradient of {name}")
        if S > 1 or name != "A_log":  # from a zero state, one step never sees A
            assert g.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("kw,B,S", CONFIGS)
def test_step_by_step_decode_equals_full_forward(kw, B, S):
    mixer = make(**kw)
    x = torch.randn(B, S, kw["d_model"], dtype=torch.float64)
    full_cache = mixer.new_cache(B)
    y_full = mixer(x, cache=full_cache)
    # A cache only records (S == 1 takes the recurrent step, hence rounding-level differences).
    torch.testing.assert_close(y_full, mixer(x), rtol=1e-12, atol=1e-12)

    step_cache = mixer.new_cache(B)
    y_steps = torch.cat([mixer(x[:, t:t + 1], cache=step_cache) for t in range(S)], dim=1)
    torch.testing.assert_close(y_steps, y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step_cache.ssm_state_BIN, full_cache.ssm_state_BIN, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step_cache.conv_state_BIW, full_cache.conv_state_BIW)


def test_prefill_then_decode_equals_full_forward():
    mixer = make(d_model=8, d_state=4, chunk_size=4)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y_full = mixer(x)
    cache = mixer.new_cache(2)
    y = torch.cat([mixer(x[:, :5], cache=cache), mixer(x[:, 5:6], cache=cache),
                   mixer(x[:, 6:], cache=cache)], dim=1)
    torch.testing.assert_close(y, y_full, rtol=1e-10, atol=1e-10)


def test_chunked_scan_equals_recurrent_steps_with_initial_state():
    torch.manual_seed(0)
    B, S, I, N = 2, 11, 3, 4
    x, dt = torch.randn(B, S, I), torch.rand(B, S, I) * 2  # large dt: strong decay stresses the exps
    A = -torch.rand(I, N) * 8
    Bm, Cm = torch.randn(B, S, N), torch.randn(B, S, N)
    h0 = torch.randn(B, I, N)
    y, h = selective_scan(x, dt, A, Bm, Cm, h0, chunk_size=4)
    y_seq, h_seq = selective_scan(x, dt, A, Bm, Cm, h0)  # the sequential default
    torch.testing.assert_close(y_seq, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_seq, h, rtol=1e-5, atol=1e-5)
    h_step, ys = h0, []
    for t in range(S):
        y_t, h_step = ssm_step(h_step, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])
        ys.append(y_t)
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_step, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,S,chunk", [pytest.param(2, 6, None, id="S6-sequential"),
                                       pytest.param(1, 9, 4, id="S9-chunked")])
def test_matches_transformers_jamba_mixer(B, S, chunk):
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaMambaMixer

    hf_config = JambaConfig(hidden_size=16, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                            mamba_dt_rank="auto", num_hidden_layers=2, vocab_size=32)
    hf = JambaMambaMixer(hf_config, layer_idx=0).eval()
    ours = MambaMixer(MambaConfig(d_model=16, d_state=4, d_conv=4, expand=2, chunk_size=chunk))
    randomize(ours, seed=3)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(B, S, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
        mask_BS = torch.ones(B, S, dtype=torch.bool)
        mask_BS[0, :2] = False  # a left-padded first sequence
        torch.testing.assert_close(ours(x, mask_BS=mask_BS), hf(x, attention_mask=mask_BS),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(d_model=16), id="jamba-defaults"),
    pytest.param(dict(d_model=10, d_state=3, dt_rank=5, bias=True, conv_bias=False), id="biases"),
    pytest.param(dict(d_model=12, dt_layernorm=False, expand=3), id="no-norms"),
])
def test_num_params_equals_built_module(kw):
    config = MambaConfig(**kw)
    assert num_params(config) == sum(p.numel() for p in MambaMixer(config).parameters())


def test_dt_rank_auto_is_ceil_d_model_over_16():
    assert MambaConfig(d_model=4096).rank == 256
    assert MambaConfig(d_model=17).rank == 2


@pytest.mark.parametrize("kw,field", [
    pytest.param(dict(d_model=0), "d_model", id="d_model-zero"),
    pytest.param(dict(d_model=8, d_state=-1), "d_state", id="d_state-negative"),
    pytest.param(dict(d_model=8, d_conv=0), "d_conv", id="d_conv-zero"),
    pytest.param(dict(d_model=8, expand=1.5), "expand", id="expand-float"),
    pytest.param(dict(d_model=8, dt_rank=0), "dt_rank", id="dt_rank-zero"),
    pytest.param(dict(d_model=8, norm_eps=0.0), "norm_eps", id="norm_eps-zero"),
    pytest.param(dict(d_model=8, chunk_size=0), "chunk_size", id="chunk_size-zero"),
    pytest.param(dict(d_model=8, chunk_size=2.0), "chunk_size", id="chunk_size-float"),
])
def test_bad_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MambaConfig(**kw)


def test_bad_inputs_raise():
    mixer = MambaMixer(MambaConfig(d_model=8, d_state=4))
    with pytest.raises(ValueError, match=r"\(B, S, 8\)"):
        mixer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="new_cache"):
        mixer(torch.randn(2, 1, 8), cache=mixer.new_cache(3))
    assert isinstance(mixer.new_cache(2), MambaCache)
