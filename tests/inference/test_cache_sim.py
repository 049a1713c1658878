"""Routing traces from live runs and the cache simulator: a trace recorded from an offloaded run,
replayed, gives exactly the live cache's counters; the policies against the slow reference; the
`moekit generate --trace` / `moekit cache-sim` commands and their errors."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.analysis.trace import RoutingTrace
from moekit.cli import main
from moekit.inference import Engine, Request, SamplingParams, generate, load
from moekit.inference.cache_policy import top_experts
from moekit.inference.cache_sim import expert_uses, layer_calls, replay, simulate
from moekit.inference.offload import expert_sizes
from moekit.inference.trace_recorder import TraceRecorder
from tests.inference.tiny import save_tiny_with_tokenizer
from tests.reference.expert_cache import simulate as reference

FAMILIES = ["mixtral", "qwen2_moe", "jamba"]  # all-MoE; shared experts + a dense layer; Mamba layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for model_type in FAMILIES:
        path = tmp_path_factory.mktemp(model_type)
        save_tiny_with_tokenizer(model_type, path)
        out[model_type] = path
    return out


def serve_batch(loaded, recorder, *, max_batch_size=2, prefill_chunk=4, seed=0) -> list[Request]:
    """Three requests of different lengths through one engine: prefill chunks interleave with
    batched decode steps, requests join and leave."""
    rng = random.Random(seed)
    engine = Engine(loaded, max_batch_size=max_batch_size, max_len=40, prefill_chunk=prefill_chunk, trace=recorder)
    vocab = loaded.model.config.vocab_size
    requests = [Request(prompt_ids=[rng.randrange(3, vocab) for _ in range(n)],
                        params=SamplingParams(max_new_tokens=m, temperature=0.0, ignore_eos=True), routing=True)
                for n, m in ((7, 5), (3, 8), (10, 3))]
    for r in requests:
        engine.submit(r)
    while any(not r.done for r in requests):
        engine.step()
    return requests


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("slots_per_layer", [1, 3])
def test_replayed_trace_equals_the_live_cache(saved, model_type, policy, slots_per_layer):
    path = saved[model_type]
    sizes = expert_sizes(path)
    slots = slots_per_layer * len(sizes.num_experts)
    loaded = load(path, offload_experts=True, expert_cache=slots * sizes.slot_bytes, policy=policy)
    recorder = TraceRecorder()
    serve_batch(loaded, recorder)
    live = loaded.model.expert_cache.stats
    assert loaded.model.expert_cache.spec.nbytes == sizes.slot_bytes
    calls = layer_calls(recorder.trace())
    sim = simulate(calls, slots=slots, policy=policy, read_bytes=sizes.read_bytes, tokens=recorder.num_tokens)
    assert (sim.hits, sim.misses, sim.bytes_read) == (live.hits, live.misses, live.bytes_read)
    assert live.misses > 0 and (live.hits > 0 or slots_per_layer == 1)
    assert expert_uses(calls) == live.uses


def test_replayed_trace_equals_the_live_pinned_cache(saved):
    path = saved["mixtral"]
    sizes = expert_sizes(path)
    first = TraceRecorder()
    serve_batch(load(path, offload_experts=True, expert_cache=4 * sizes.slot_bytes), first)
    counts = expert_uses(layer_calls(first.trace()))
    loaded = load(path, offload_experts=True, expert_cache=4 * sizes.slot_bytes, policy="pinned", pin=counts)
    second = TraceRecorder()
    serve_batch(loaded, second, seed=1)
    live = loaded.model.expert_cache.stats
    sim = simulate(layer_calls(second.trace()), slots=4, policy="pinned", read_bytes=sizes.read_bytes,
                   tokens=second.num_tokens, sticky=tuple(top_experts(counts, 2)))
    assert (sim.hits, sim.misses) == (live.hits, live.misses)


def test_recorded_trace_holds_every_token_of_every_request(saved):
    path = saved["qwen2_moe"]
    loaded = load(path)
    recorder = TraceRecorder()
    requests = serve_batch(loaded, recorder)
    trace = recorder.trace()
    moe = [i for i, layer in enumerate(loaded.model.model.layers) if layer.mlp.__class__.__name__ == "MoELayer"]
    assert [lt.layer for lt in trace.layers] == moe  # the dense layer is not traced
    assert trace.step_N is not None and bool((trace.step_N[1:] >= trace.step_N[:-1]).all())
    for r in requests:
        mine = trace.sequence_N == r.id
        fed = r.prompt_ids + r.output_ids[:-1]  # the last sampled token is never fed back
        assert trace.token_ids_N[mine].tolist() == fed
        assert trace.position_N[mine].tolist() == list(range(len(fed)))
        for lt in trace.layers:
            ids = lt.expert_ids_NK[mine]
            counts = torch.bincount(ids[ids >= 0], minlength=lt.num_experts)
            assert torch.equal(counts, r.routing_counts[lt.layer])  # the engine's own per-request counts


def test_trace_round_trips_with_its_steps(saved, tmp_path):
    recorder = TraceRecorder()
    result = generate(load(saved["mixtral"]), "hello", max_new_tokens=4, temperature=0.0, trace=recorder)
    file = recorder.save(tmp_path / "t.safetensors")
    back = RoutingTrace.load(file)
    assert back.num_tokens == len(result.prompt_ids) + len(result.token_ids) - 1
    assert torch.equal(back.step_N, recorder.trace().step_N)
    assert back.step_N.tolist() == [0] * len(result.prompt_ids) + list(range(1, len(result.token_ids)))
    assert layer_calls(back) == layer_calls(recorder.trace())


def test_recorder_max_tokens_stops_recording(saved):
    loaded = load(saved["mixtral"])
    recorder = TraceRecorder(max_tokens=6)
    result = generate(loaded, "abcd", max_new_tokens=5, temperature=0.0, trace=recorder)
    prompt = len(result.prompt_ids)  # 5 with the BOS: the prefill and one decode step fit in 6
    assert prompt == 5 and recorder.truncated and recorder.num_tokens == 6
    assert recorder.trace().step_N.tolist() == [0] * 5 + [1]
    empty = TraceRecorder(max_tokens=3)
    generate(loaded, "abcd", max_new_tokens=2, temperature=0.0, trace=empty)
    with pytest.raises(ValueError, match="no routing was recorded"):
        empty.trace()
    with pytest.raises(ValueError, match="max_tokens=0"):
        TraceRecorder(max_tokens=0)


# ---- the policies against the slow reference ---------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), slots=st.integers(1, 9), policy=st.sampled_from(["lru", "lfu", "pinned", "belady"]),
       layers=st.integers(1, 3), experts=st.integers(2, 6), n=st.integers(1, 40))
def test_simulator_equals_the_reference_cache(seed, slots, policy, layers, experts, n):
    rng = random.Random(seed)
    calls = [(rng.randrange(layers), tuple(sorted(rng.sample(range(experts), rng.randint(1, experts)))))
             for _ in range(n)]
    sticky = tuple(top_experts(expert_uses(calls), slots // 2)) if policy == "pinned" else ()
    got = simulate(calls, slots=slots, policy=policy, read_bytes={i: 10 for i in range(layers)}, tokens=n,
                   sticky=sticky)
    assert (got.hits, got.misses) == reference(calls, slots, policy, frozenset(sticky))
    assert got.bytes_read == 10 * got.misses
    if policy == "belady":  # the optimum: no policy misses less
        for other in ("lru", "lfu"):
            assert got.misses <= reference(calls, slots, other)[1]


def test_replay_budgets_and_bad_input(saved):
    recorder = TraceRecorder()
    generate(load(saved["mixtral"]), "abc", max_new_tokens=3, temperature=0.0, trace=recorder)
    trace = recorder.trace()
    results = replay(trace, [100, 250], slot_bytes=50, read_bytes=7, policies=("lru", "belady"))
    assert [(r.budget, r.slots, r.policy) for r in results] == [(100, 2, "lru"), (100, 2, "belady"),
                                                                  (250, 5, "lru"), (250, 5, "belady")]
    assert all(r.bytes_read == 7 * r.misses and r.tokens == trace.num_tokens for r in results)
    with pytest.raises(ValueError, match="smaller than one expert"):
        replay(trace, [49], slot_bytes=50, read_bytes=50)
    with pytest.raises(ValueError, match="policy 'fifo'"):
        replay(trace, [100], slot_bytes=50, read_bytes=50, policies=("fifo",))


# ---- the commands ---------------------------------------------------------------------------------
def test_cli_generate_trace_then_cache_sim(saved, tmp_path, capsys):
    path = saved["mixtral"]
    slot = expert_sizes(path).slot_bytes
    file = tmp_path / "run" / "trace.safetensors"
    assert main(["generate", str(path), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0",
                 "--offload-experts", "--expert-cache", str(3 * slot), "--trace", str(file)]) == 0
    err = capsys.readouterr().err
    live = err.split("[expert cache: ")[1]
    hits, misses = int(live.split(" hits")[0]), int(live.split(", ")[1].split(" misses")[0])
    assert main(["cache-sim", str(file), "--budget", str(3 * slot), "50%", "--model", str(path), "--json"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    lru = next(r for r in rows if r["policy"] == "lru" and r["slots"] == 3)
    assert (lru["hits"], lru["misses"]) == (hits, misses)
    assert {r["policy"] for r in rows} == {"lru", "lfu", "pinned", "belady"}
    assert {r["slots"] for r in rows} == {3, 4}  # 50% of 2 layers x 4 experts
    assert main(["cache-sim", str(file), "--budget", "25%", "--expert-bytes", "1MB"]) == 0
    assert "| lru |" in capsys.readouterr().out


@pytest.mark.parametrize("make, args, match", [
    pytest.param(None, ["--expert-bytes", "10"], "does not exist", id="missing"),
    pytest.param(lambda f: f.write_bytes(b"not a trace"), ["--expert-bytes", "10"], "not a safetensors file",
                 id="malformed"),
    pytest.param("trace", ["--expert-bytes", "10", "--budget", "9"], "smaller than one expert", id="tiny-budget"),
    pytest.param("trace", ["--expert-bytes", "10", "--budget", "lots"], "--budget 'lots' is invalid", id="budget"),
    pytest.param("trace", ["--model", "qwen2_moe"], "the trace comes from another model", id="other-model"),
])
def test_cache_sim_bad_input(saved, tmp_path, capsys, make, args, match):
    file = tmp_path / "t.safetensors"
    if make == "trace":
        recorder = TraceRecorder()
        generate(load(saved["mixtral"]), "ab", max_new_tokens=2, temperature=0.0, trace=recorder)
        recorder.save(file)
    elif make is not None:
        make(file)
    args = [str(saved[a]) if a in saved else a for a in args]
    budget = [] if "--budget" in args else ["--budget", "100"]
    assert main(["cache-sim", str(file), *budget, *args]) == 2
    assert match in capsys.readouterr().err
