"""moekit vs transformers on tiny random checkpoints of every supported model_type.

Logits (prefill and cached decoding) within 1e-4 in fp32, identical routing, a save round trip
transformers loads to the same logits, and every tensor back bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

import moekit
from moekit.hf.save import save_pretrained
from moekit.hf.io import CheckpointReader
from tests.hf.tiny import CASES, MODEL_TYPES, VOCAB, hf_router_ids, save_tiny

ATOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Case id -> (case id, checkpoint dir, transformers model, moekit model), built once per case."""
    cache: dict[str, tuple] = {}

    def get(case: str) -> tuple:
        if case not in cache:
            model_type, overrides = CASES[case]
            path = tmp_path_factory.mktemp(case)
            hf_model = save_tiny(model_type, path, overrides)
            cache[case] = (case, path, hf_model, moekit.from_pretrained(path))
        return cache[case]

    return get


@pytest.fixture(params=[pytest.param(case, id=case) for case in CASES])
def pair(request, built):
    """Every case: the base config of each model_type and the config variants."""
    return built(request.param)


@pytest.fixture(params=[pytest.param(t, id=t) for t in MODEL_TYPES])
def base_pair(request, built):
    """The base config of each model_type (layout tests do not depend on config variants)."""
    return built(request.param)


def _tokens(B: int = 2, S: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_prefill_logits_and_routing(pair):
    model_type, _, hf_model, model = pair
    tokens = _tokens()
    with torch.no_grad():
        want = hf_model(tokens).logits
        out = model(tokens)
    assert out.logits.shape == want.shape
    assert _diff(out.logits, want) <= ATOL, model_type
    hf_ids = hf_router_ids(hf_model, tokens)
    ours = [d.expert_ids_TK.sort(-1).values for d in out.routing if d is not None]
    assert len(ours) == len(hf_ids) >= 1
    for layer, (a, b) in enumerate(zip(ours, hf_ids)):
        assert torch.equal(a, b), f"{model_type}: routing differs in MoE layer {layer}"


def test_cached_decoding(pair):
    model_type, _, hf_model, model = pair
    tokens, prompt = _tokens(S=6, seed=2), 3
    with torch.no_grad():
        hf_out = hf_model(tokens[:, :prompt], use_cache=True)
        want = [hf_out.logits]
        for t in range(prompt, tokens.shape[1]):
            hf_out = hf_model(tokens[:, t:t + 1], past_key_values=hf_out.past_key_values, use_cache=True)
            want.append(hf_out.logits)
        cache = model.new_cache()
        got = [model(tokens[:, :prompt], cache=cache).logits]
        got += [model(tokens[:, t:t + 1], cache=cache).logits for t in range(prompt, tokens.shape[1])]
        full = hf_model(tokens).logits
    assert _diff(torch.cat(got, 1), torch.cat(want, 1)) <= ATOL, model_type
    assert _diff(torch.cat(got, 1), full) <= ATOL, model_type


def test_save_round_trip(pair, tmp_path):
    model_type, path, _, model = pair
    model.save_pretrained(tmp_path)
    # every tensor transformers wrote comes back bit for bit, under the same name
    original, again = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(again) == sorted(original)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    # and transformers rebuilds the same model from our config.json
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _tokens(seed=3)
    with torch.no_grad():
        assert _diff(reloaded(tokens).logits, model(tokens).logits) <= ATOL, model_type


def test_fused_layout_loads(base_pair, tmp_path):
    _, _, hf_model, model = base_pair
    save_pretrained(model, tmp_path, layout="fused")
    fused = moekit.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name
    # the fused layout is transformers' in-memory one: its state_dict keys and tensors
    written = load_file(tmp_path / "model.safetensors")
    hf_state = hf_model.state_dict()
    for key, tensor in written.items():
        assert torch.equal(tensor, hf_state[key]), key


def test_sharded_checkpoint_both_ways(base_pair, tmp_path):
    _, path, hf_model, model = base_pair
    hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
    hf_model.save_pretrained(hf_dir, max_shard_size="20KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    loaded = moekit.from_pretrained(hf_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    files = save_pretrained(model, ours_dir, max_shard_size="20KB")
    assert "model.safetensors.index.json" in files and len(files) > 3
    # our shards hold exactly what transformers' single file holds (its loader reads the same index)
    original = load_file(path / "model.safetensors")
    with CheckpointReader(ours_dir) as reader:
        assert sorted(reader.keys()) == sorted(original) and len(reader.files()) > 1
        for key, tensor in original.items():
            assert torch.equal(reader.get(key), tensor), key
