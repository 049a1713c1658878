"""Offloaded experts: bit-identical logits to the in-memory model at every cache size, policy and
with prefetch; the cache's pins, policies and counters against slow references."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekit
from moekit.inference.expert_cache import ExpertCache, SlotSpec
from moekit.inference.offload import model_offload_stats
from tests.hf.tiny import VOCAB, save_tiny
from tests.inference.offload_helpers import expert_bytes, greedy_logits, load_quiet
from tests.reference.expert_cache import simulate

# mixtral: per-expert keys; qwen2_moe: shared experts and a dense layer; gpt_oss: interleaved gate/up
# with biases; dbrx: experts flattened along rows; jamba: Mamba layers and MoE every other layer.
FAMILIES = ["mixtral", "qwen2_moe", "gpt_oss", "dbrx", "jamba"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> (directory, in-memory model); the fused-layout copy of mixtral as 'mixtral-fused'."""
    out = {}
    for model_type in FAMILIES:
        path = tmp_path_factory.mktemp(model_type)
        save_tiny(model_type, path)
        out[model_type] = (path, moekit.from_pretrained(path))
    fused = tmp_path_factory.mktemp("mixtral-fused")
    out["mixtral"][1].save_pretrained(str(fused), layout="fused")
    out["mixtral-fused"] = (fused, out["mixtral"][1])
    return out


def num_experts_total(model) -> int:
    return sum(layer.config.num_experts for layer in model.moe_layers())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.sampled_from([*FAMILIES, "mixtral-fused"]),
    slot_frac=st.floats(0.0, 0.99),
    policy=st.sampled_from(["lru", "lfu"]),
    prefetch=st.booleans(),
    B=st.integers(1, 3),
    S=st.sampled_from([1, 3, 7, 40]),  # 40 tokens x top-2 = 80 rows: Experts' grouped (prefill) path
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_offloaded_logits_equal_in_memory(checkpoints, case, slot_frac, policy, prefetch, B, S, steps, seed):
    path, ref = checkpoints[case]
    total = num_experts_total(ref)
    slots = 1 + int(slot_frac * (total - 1))  # 1 .. total - 1 experts
    model = load_quiet(path, offload_experts=True, expert_cache=slots * expert_bytes(ref), policy=policy,
                       prefetch=prefetch)
    try:
        prompt = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))
        want, got = greedy_logits(ref, prompt, steps), greedy_logits(model, prompt, steps)
        for i, (w, g) in enumerate(zip(want, got)):
            assert torch.equal(w, g), f"step {i}: max diff {(w - g).abs().max().item()}"
        stats = model_offload_stats(model)
        assert stats.misses > 0 and stats.hits + stats.misses == sum(stats.uses.values())
    finally:
        model.expert_cache.close()


@pytest.mark.parametrize("case", ["mixtral", "gpt_oss", "jamba"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
def test_one_expert_per_layer(checkpoints, case, prefetch):
    path, ref = checkpoints[case]
    budget = len(ref.moe_layers()) * expert_bytes(ref)
    model = load_quiet(path, offload_experts=True, expert_cache=budget, prefetch=prefetch)
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    for w, g in zip(greedy_logits(ref, prompt, 6), greedy_logits(model, prompt, 6)):
        assert torch.equal(w, g)
    assert model.expert_cache.num_slots == len(ref.moe_layers())
    model.expert_cache.close()


def routed_sets(model, prompt_BS, steps) -> list[tuple[int, list[int]]]:
    """(layer, sorted distinct experts) of every MoE layer call of a greedy decode (in-memory model)."""
    calls: list[tuple[int, list[int]]] = []
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, moekit.MoELayer):
            def hook(module, args, out, i=i):
                ids = out.decision.expert_ids_TK
                calls.append((i, sorted(e for e in ids.unique().tolist() if e >= 0)))
            hooks.append(layer.mlp.register_forward_hook(hook))
    try:
        greedy_logits(model, prompt_BS, steps)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("slots", [1, 3, 6])
def test_counters_match_a_simulated_cache(checkpoints, policy, slots):
    path, ref = checkpoints["mixtral"]
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    calls = routed_sets(ref, prompt, 8)
    model = load_quiet(path, offload_experts=True, expert_cache=slots * expert_bytes(ref), policy=policy)
    greedy_logits(model, prompt, 8)
    stats = model_offload_stats(model)
    assert (stats.hits, stats.misses) == simulate(calls, slots, policy)
    assert stats.bytes_read == stats.misses * model.expert_cache.spec.nbytes  # fp32 file, fp32 slots


def test_pinned_policy_keeps_the_most_used_experts(checkpoints):
    path, ref = checkpoints["mixtral"]
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    budget = 4 * expert_bytes(ref)
    recorded = load_quiet(path, offload_experts=True, expert_cache=budget)
    greedy_logits(recorded, prompt, 6)
    counts = dict(model_offload_stats(recorded).uses)
    model = load_quiet(path, offload_experts=True, expert_cache=budget, policy="pinned", pin=counts)
    want = greedy_logits(ref, prompt, 6)
    for w, g in zip(want, greedy_logits(model, prompt, 6)):
        assert torch.equal(w, g)
    top2 = sorted(counts, key=lambda k: (-counts[k], k))[:2]  # pin_fraction 0.5 of 4 slots
    assert set(top2) <= model.expert_cache.resident()
    stats = model_offload_stats(model)
    assert (stats.hits, stats.misses) == simulate(routed_sets(ref, prompt, 6), 4, "pinned", frozenset(top2))
    assert (stats.hits, stats.misses) != simulate(routed_sets(ref, prompt, 6), 4, "lru")  # pinning changed it


def test_prefetch_prediction_counters_match_a_reference(checkpoints):
    """Prefetch predicts layer l+1's experts with its router on layer l's MoE input; the counters
    equal a recomputation of that on the in-memory model."""
    path, ref = checkpoints["mixtral"]
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    inputs: list[tuple[int, torch.Tensor]] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.append((i, a[0])), with_kwargs=True)
             for i, layer in enumerate(ref.model.layers)]
    try:
        calls = routed_sets(ref, prompt, 5)
    finally:
        for h in hooks:
            h.remove()
    predicted = used = needed = 0
    layers = ref.model.layers
    assert [i for i, _ in inputs] == [i for i, _ in calls]  # every layer of mixtral is an MoE layer
    for j, (i, x) in enumerate(inputs):
        if i + 1 < len(layers):
            ids = layers[i + 1].mlp.router(x.reshape(-1, x.shape[-1])).expert_ids_TK.unique().tolist()
            nxt = calls[j + 1][1]  # the same forward's call of layer i + 1
            predicted, used, needed = predicted + len(ids), used + len(set(ids) & set(nxt)), needed + len(nxt)
    model = load_quiet(path, offload_experts=True, expert_cache=3 * expert_bytes(ref), prefetch=True)
    greedy_logits(model, prompt, 5)
    stats = model_offload_stats(model)
    model.expert_cache.close()
    assert (stats.predicted, stats.predicted_used, stats.needed_with_prediction) == (predicted, used, needed)
    assert 0 < stats.prediction_recall <= 1 and stats.prefetch_reads > 0


# ---- the cache itself ------------------------------------------------------------------------------
def filler(log: list | None = None, gate: threading.Event | None = None):
    def load(key, views):
        if gate is not None and key[1] >= 100:
            gate.wait(5)
        views["w"].fill_(float(key[0] * 1000 + key[1]))
        if log is not None:
            log.append(key)
        return 4
    return load


SPEC = SlotSpec((("w", (4,), torch.float32),))


def test_pinned_expert_is_never_overwritten():
    cache = ExpertCache(SPEC, 2, filler())
    a, b = cache.acquire((0, 1))["w"], cache.acquire((0, 2))["w"]  # both slots pinned
    got = {}

    def miss() -> None:
        got["c"] = cache.acquire((0, 3))["w"].clone()
        cache.release((0, 3))

    t = threading.Thread(target=miss)
    t.start()
    t.join(0.3)
    assert t.is_alive(), "a miss took a pinned slot"
    assert a.eq(1).all() and b.eq(2).all()
    cache.release((0, 2))
    t.join(5)
    assert not t.is_alive() and got["c"].eq(3).all() and a.eq(1).all()  # (0, 2)'s slot was the one free
    cache.release((0, 1))


def test_prefetch_skips_pinned_slots_and_never_waits():
    log: list = []
    cache = ExpertCache(SPEC, 2, filler(log), prefetch=True)
    order = cache.begin_call(0, [1, 2])
    views = [cache.acquire((0, e))["w"] for e in order]
    cache.prefetch(1, [5, 6])  # every slot is pinned: nothing may be read over them
    cache.close()
    assert log == [(0, 1), (0, 2)] and views[0].eq(1).all() and views[1].eq(2).all()
    for e in order:
        cache.release((0, e))
    cache.end_call()


def test_layer_call_waits_for_an_expert_in_flight():
    gate, log = threading.Event(), []
    cache = ExpertCache(SPEC, 3, filler(log, gate), prefetch=True)
    cache.prefetch(0, [100])  # blocks in the loader until the gate opens
    deadline = threading.Event()
    while (0, 100) not in cache._slot_of and not deadline.wait(0.01):
        pass
    threading.Timer(0.2, gate.set).start()
    order = cache.begin_call(0, [100])
    views = cache.acquire((0, 100))
    assert views["w"].eq(100).all() and log == [(0, 100)]
    assert cache.stats.hits == 1 and cache.stats.prefetch_hits == 1 and cache.stats.misses == 0
    cache.release((0, 100))
    cache.end_call()
    cache.close()
    assert order == [100]


def test_lru_and_lfu_victims():
    for policy, want in (("lru", (0, 2)), ("lfu", (0, 3))):
        log: list = []
        cache = ExpertCache(SPEC, 3, filler(log), policy=policy)
        for e in (1, 1, 1, 2, 3, 2, 1):  # uses: 1 x4, 2 x2, 3 x1; least recent: 3, then 2
            cache.acquire((0, e))
            cache.release((0, e))
        cache.acquire((0, 9))
        cache.release((0, 9))
        evicted = {(0, 1), (0, 2), (0, 3)} - cache.resident()
        assert evicted == {want if policy == "lfu" else (0, 3)}, policy


# ---- bad input -------------------------------------------------------------------------------------
def test_budget_smaller_than_one_expert(checkpoints):
    path, ref = checkpoints["mixtral"]
    with pytest.raises(ValueError, match="smaller than one expert"):
        moekit.from_pretrained(path, offload_experts=True, expert_cache=expert_bytes(ref) - 1)


def test_budget_that_holds_every_expert_runs_in_memory(checkpoints):
    path, ref = checkpoints["mixtral"]
    with pytest.warns(UserWarning, match="offloading is not needed"):
        model = moekit.from_pretrained(path, offload_experts=True, expert_cache="1GB")
    assert not hasattr(model, "expert_cache")
    prompt = torch.randint(0, VOCAB, (1, 4))
    assert torch.equal(greedy_logits(model, prompt, 2)[-1], greedy_logits(ref, prompt, 2)[-1])


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(offload_experts=True, expert_cache="lots"), "expert_cache='lots' is invalid", id="size"),
    pytest.param(dict(offload_experts=True), "needs expert_cache", id="no-budget"),
    pytest.param(dict(offload_experts=True, expert_cache="1MB", policy="fifo"), "policy='fifo'", id="policy"),
    pytest.param(dict(offload_experts=True, expert_cache="1MB", policy="pinned"), "needs pin=", id="pin"),
    pytest.param(dict(expert_cache="1MB"), "need offload_experts=True", id="no-offload"),
])
def test_bad_options(checkpoints, kwargs, match):
    with pytest.raises(ValueError, match=match):
        moekit.from_pretrained(checkpoints["mixtral"][0], **kwargs)


def test_file_truncated_after_loading_is_a_clear_error(checkpoints, tmp_path):
    import shutil

    path, ref = checkpoints["mixtral"]
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    model = load_quiet(copy, offload_experts=True, expert_cache=2 * expert_bytes(ref))
    file = copy / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated"):
        greedy_logits(model, torch.randint(0, VOCAB, (1, 6)), 3)


def test_not_a_regular_file(tmp_path):
    from moekit.inference.expert_store import read_header

    with pytest.raises(ValueError, match="not a regular file"):
        read_header(tmp_path)
    bad = tmp_path / "x.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="past the end"):
        read_header(bad)


def test_slots_follow_the_in_memory_weight_layout(checkpoints, monkeypatch):
    """Experts whose weights are stored column-major (the Hugging Face (out, in) layout, viewed as
    (in, out)) get column-major slots, so the offloaded matmuls stay the in-memory ones bit for bit."""
    import copy

    from moekit.inference import offload

    path, ref = checkpoints["mixtral"]
    ref = copy.deepcopy(ref)
    names = set()
    for layer in ref.moe_layers():
        for name, p in layer.experts.named_parameters():
            if name.startswith("w_"):
                p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (E, F, D) storage
                names.add(name)
    monkeypatch.setattr(offload, "expert_param_transposed", lambda config: frozenset(names))
    model = load_quiet(path, offload_experts=True, expert_cache=3 * expert_bytes(ref))
    views = model.expert_cache._views[0]
    assert all(views[n].stride() == (1, views[n].shape[0]) for n in names)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    for w, g in zip(greedy_logits(ref, prompt, 4), greedy_logits(model, prompt, 4)):
        assert torch.equal(w, g)
