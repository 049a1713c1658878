"""The engine's per-row cache on catalog architectures (scaled down) with options the Hugging Face
families lack: a request alone equals the model's own KV-cache decoding, and in a batch of prompts of
different lengths equals itself alone; `logits_to_keep` equals the full logits' last positions."""

from __future__ import annotations

import pytest
import torch

from moekit.inference import Engine, LoadedModel, Request, SamplingParams, TextTokenizer
from moekit.model import MoETransformer, catalog
from moekit.model.config import ModelConfig
from tests.inference.tiny import char_tokenizer

VOCAB = 64
# Architectures whose options the Hugging Face family tests (test_engine.py) do not reach: GLaM's
# alternating dense/MoE layers, Grok-1's soft-capping and sandwich norms, Arctic's parallel MoE,
# Hunyuan's cross-layer KV sharing, Llama 4's chunked attention and NoPE layers, JetMoE's mixture
# of attention heads, and Jamba's own layout.
DECODER_PRESETS = ["GLaM (64B/64E)", "Grok-1", "Snowflake Arctic", "Hunyuan-Large", "Llama 4 Scout", "JetMoE-8B",
                   "Jamba 1.5 Mini"]
assert all(isinstance(catalog.get(n).config, ModelConfig) for n in DECODER_PRESETS)
PROMPTS = [[5, 9, 3, 17, 4, 22, 8, 31, 6, 11, 40, 2], [7, 13], [21, 3, 33, 12, 9, 50, 1]]
NEW = 6


def _loaded(name: str) -> LoadedModel:
    torch.manual_seed(0)
    config = catalog.get(name).scaled(d_model=32, n_layers=None, num_experts=4, vocab_size=VOCAB).config
    model = MoETransformer(config).eval()
    return LoadedModel(model=model, tokenizer=TextTokenizer(char_tokenizer()), eos_ids=frozenset(), name=name,
                       path=None)  # type: ignore[arg-type]


def _cache_decode(model: MoETransformer, prompt: list[int]) -> list[int]:
    """Greedy tokens with the model's own KVCache: the prompt at once, then one token at a time."""
    cache, out = model.new_cache(), []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache).logits
        for _ in range(NEW):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), cache=cache).logits
    return out


def _engine_run(loaded: LoadedModel, prompts: list[list[int]], **kw) -> list[list[int]]:
    engine = Engine(loaded, **kw)
    requests = [engine.submit(Request(prompt_ids=p, params=SamplingParams(max_new_tokens=NEW, temperature=0)))
                for p in prompts]
    while not all(r.done for r in requests):
        engine.step()
    return [r.output_ids for r in requests]


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in DECODER_PRESETS])
def test_row_cache_equals_kv_cache_and_batch_equals_alone(name):
    loaded = _loaded(name)
    if max(map(len, PROMPTS)) + NEW > loaded.context_length:
        pytest.skip("scaled context too short")
    alone = [_engine_run(loaded, [p], max_batch_size=1, prefill_chunk=64)[0] for p in PROMPTS]
    assert alone == [_cache_decode(loaded.model, p) for p in PROMPTS]
    assert _engine_run(loaded, PROMPTS, max_batch_size=3, prefill_chunk=64) == alone


def test_logits_to_keep_equals_full_logits():
    model = _loaded("Mixtral 8x7B").model
    tokens = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        full = model(tokens).logits
        assert torch.allclose(model(tokens, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(tokens, logits_to_keep=-1)


def _coupled(change: dict) -> LoadedModel:
    from dataclasses import replace

    loaded = _loaded("Mixtral 8x7B")
    config = loaded.model.config
    coupled = MoETransformer(replace(config, moe=replace(config.moe, **change))).eval()
    return LoadedModel(model=coupled, tokenizer=loaded.tokenizer, eos_ids=frozenset(), name="x",
                       path=None)  # type: ignore[arg-type]


def test_capacity_refuses_batching_but_generates_alone():
    loaded = _coupled(dict(capacity_factor=1.25))
    with pytest.raises(ValueError, match="max_batch_size=1"):
        Engine(loaded, max_batch_size=2)
    assert _engine_run(loaded, PROMPTS[:1], max_batch_size=1)[0] == _cache_decode(loaded.model, PROMPTS[0])


def test_expert_choice_cannot_generate():
    with pytest.raises(ValueError, match="not to generate"):
        Engine(_coupled(dict(router="expert_choice")), max_batch_size=1)
