"""A decoder never lets a token see later tokens through its MoE: non-causal routers are refused,
causal ones are checked by editing the last token, expert choice is allowed only to train."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.model import ModelConfig, MoETransformer
from moekit.traits import ROUTER_TRAITS

D, V, S = 16, 50, 7


def decoder(router: str, **moe) -> ModelConfig:
    extra = dict(ROUTER_TRAITS[router].demo)
    return ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32,
                       moe=MoEConfig(d_model=D, d_ff=12, num_experts=4, top_k=2, router=router,
                                     **{**extra, **moe}))


def test_a_decoder_refuses_soft_moe_and_names_the_causal_routers() -> None:
    with pytest.raises(ValueError, match="moe.router='soft'") as err:
        decoder("soft")
    assert "topk" in str(err.value) and "encoder" in str(err.value)


@pytest.mark.parametrize("router", [pytest.param(n, id=n) for n, t in ROUTER_TRAITS.items()
                                    if t.causal in ("token", "at_eval")])
def test_editing_the_last_token_leaves_earlier_logits_unchanged(router: str) -> None:
    torch.manual_seed(0)
    model = MoETransformer(decoder(router)).eval()
    tokens_BS = torch.randint(0, V, (2, S))
    edited_BS = tokens_BS.clone()
    edited_BS[:, -1] = (edited_BS[:, -1] + 1) % V
    with torch.no_grad():
        a = model(tokens_BS).logits
        b = model(edited_BS).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)  # the soft leak was 0.2
    assert not torch.equal(a[:, -1], b[:, -1])  # the edit reached the model


def test_decoder_layers_always_call_the_moe_causally(monkeypatch) -> None:
    seen = []
    forward = MoELayer.forward

    def spy(self, x, **kwargs):
        seen.append(kwargs.get("causal"))
        return forward(self, x, **kwargs)

    monkeypatch.setattr(MoELayer, "forward", spy)
    MoETransformer(decoder("topk"))(torch.randint(0, V, (1, S)))
    assert seen == [True, True]


def test_expert_choice_decoder_trains_with_a_warning_but_refuses_to_generate() -> None:
    with pytest.warns(UserWarning, match="ranks tokens over the whole batch"):
        model = MoETransformer(decoder("expert_choice"))
    tokens_BS = torch.randint(0, V, (2, S))
    out = model(tokens_BS, targets_BS=tokens_BS)  # a training forward works
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="KV cache is refused"):
        model(tokens_BS, cache=model.new_cache())
