"""Offloaded and quantized experts: decode tokens/s, peak RSS and hit rates vs cache size.

Builds a random Mixtral-layout checkpoint (fp32) whose routed experts are several times the
largest partial cache, then decodes the same greedy continuation in one fresh subprocess per case
(so each peak RSS, VmHWM, is that case's own): fully in memory (fp32, int8, int4), and offloaded with a
cache of 10/25/50/99% of the fp32 experts (100% loads in memory by design), LRU vs LFU vs LRU with
prefetch, fp32 vs int8 vs int4 experts in the cache. The checkpoint was just written, so its pages
are in the page cache ("warm"); a warm-up decode runs before the timed one. Speeds are printed as
ratios to the in-memory fp32 run of the same invocation (the 2-core CPU is shared; absolute figures
are noisy). Random routers route about uniformly: a worst case for caching next to real models.

    nice -n 10 python benchmarks/offload.py            # about 400 MB of experts
    nice -n 10 python benchmarks/offload.py --quick    # about 100 MB, a minute or two
    nice -n 10 python benchmarks/offload.py --quick --repeat 3   # every case 3 times, round-robin
    nice -n 10 python benchmarks/offload.py --quick --sim        # a run's trace replayed by the simulator

With --repeat N every case runs N times, the cases taking turns, and tok/s is each case's median, so
load that comes and goes on the shared machine falls on every case alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_MODEL, EXPERTS, TOP_K, VOCAB = 512, 8, 2, 1024


def build(path: Path, layers: int) -> int:
    import torch

    from moekit.hf.families import FAMILIES
    from moekit.model.transformer import MoETransformer

    hf = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=layers,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
              num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    with torch.no_grad():
        model = MoETransformer(FAMILIES["mixtral"].to_moekit(hf))
        for layer in model.moe_layers():  # spread router logits so routing is not a coin toss
            layer.router.gate.weight.mul_(20)
        model.save_pretrained(str(path), model_type="mixtral")
    return layers * EXPERTS * 3 * D_MODEL * 2 * D_MODEL * 4


def peak_rss() -> int:
    """VmHWM, this process image's peak RSS (ru_maxrss would carry the parent's across execve)."""
    from tests.inference.offload_memory import _peak

    return _peak()


def child(case: dict) -> dict:
    import torch

    import moekit
    from moekit.inference.offload import model_offload_stats

    torch.set_num_threads(case["threads"])
    from moekit.hf.families import FAMILIES
    from moekit.hf.io import read_config

    with torch.device("meta"):  # one-off lazy initialisation inside torch, before the baseline
        moekit.MoETransformer(FAMILIES["mixtral"].to_moekit(read_config(case["path"])))
    base_rss = peak_rss()
    kwargs: dict = {}
    if case.get("quantize"):
        kwargs["quantize"] = case["quantize"]
    if case.get("cache"):
        kwargs.update(offload_experts=True, expert_cache=case["cache"], policy=case["policy"],
                      prefetch=case["prefetch"])
    model = moekit.from_pretrained(case["path"], **kwargs)
    prompt = torch.arange(8).view(1, 8)
    recorder = None
    if case.get("trace"):
        from moekit.inference.trace_recorder import TraceRecorder

        recorder = TraceRecorder()
    runs = iter(range(10**6))

    def forward(tokens_BS, kv, seq: int, pos: int):
        out = model(tokens_BS, cache=kv)
        if recorder is not None:
            recorder.record(out.routing, tokens_BS, sequence_B=torch.tensor([seq]), start_B=torch.tensor([pos]))
        return out.logits

    def decode(n: int) -> tuple[float, list[int]]:
        kv, seq = model.new_cache(), next(runs)
        with torch.no_grad():
            logits = forward(prompt, kv, seq, 0)
            out, start = [], time.perf_counter()
            for i in range(n):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
                logits = forward(nxt, kv, seq, prompt.shape[1] + i)
        return n / (time.perf_counter() - start), out

    decode(4)  # warm-up
    cache = getattr(model, "expert_cache", None)
    before = dict(cache.stats.summary()) if cache is not None else None
    tok_s, tokens = decode(case["tokens"])
    out = {"tok_s": tok_s, "peak_rss": peak_rss(), "base_rss": base_rss,
           "tokens": tokens, "resident": sum(p.numel() * p.element_size() for p in model.parameters())
           + sum(b.numel() * b.element_size() for b in model.buffers())}
    if cache is not None:
        s = model_offload_stats(model)
        hits, misses = s.hits - before["hits"], s.misses - before["misses"]
        out.update(hit_rate=hits / max(1, hits + misses), cache_bytes=cache.nbytes,
                   recall=s.prediction_recall, slots=cache.num_slots, total_hits=s.hits, total_misses=s.misses,
                   total_bytes_read=s.bytes_read)
        cache.close()
    if recorder is not None:
        recorder.save(case["trace"])
    return out


def simulated(path: Path, base: dict, experts: int, tokens: int) -> None:
    """Record the routing of the LRU 25% run, replay it at 10/25/50% with every policy, and set the
    replayed LRU 25% beside the live cache's counters (warm-up and timed decode together)."""
    from moekit.analysis.trace import RoutingTrace
    from moekit.inference.cache_sim import replay
    from moekit.inference.offload import expert_sizes

    file = path / "trace.safetensors"
    live = run({**base, "cache": int(0.25 * experts), "trace": str(file)})
    sizes = expert_sizes(path)
    trace = RoutingTrace.load(file)
    results = replay(trace, [int(f * experts) for f in (0.10, 0.25, 0.50)], slot_bytes=sizes.slot_bytes,
                     read_bytes=sizes.read_bytes)
    print(f"replay of the LRU 25% run's routing trace ({trace.num_tokens} tokens, warm-up included): live "
          f"cache {live['total_hits']} hits, {live['total_misses']} misses, {live['total_bytes_read']} bytes read")
    print("| budget | slots | policy | hit rate | misses | MB read per token | equals live |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        same = "-"
        if r.policy == "lru" and r.slots == live["slots"]:
            same = str((r.hits, r.misses, r.bytes_read) ==
                       (live["total_hits"], live["total_misses"], live["total_bytes_read"]))
        print(f"| {r.budget / experts:.0%} | {r.slots} | {r.policy} | {r.hit_rate:.3f} | {r.misses} | "
              f"{r.bytes_per_token / 1e6:.2f} | {same} |")


def run(case: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="runs of every case, round-robin; tok/s is the median")
    p.add_argument("--sim", action="store_true",
                   help="only record the LRU 25%% run's routing trace and replay it (moekit cache-sim)")
    p.add_argument("--child")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    layers, tokens = (2, 12) if a.quick else (8, 24)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        experts = build(path, layers)
        base = dict(path=str(path), threads=a.threads, tokens=tokens, policy="lru", prefetch=False)
        if a.sim:
            simulated(path, base, experts, tokens)
            return
        cases: list[tuple[str, dict]] = [("in memory fp32", {}), ("in memory int8", {"quantize": "int8"}),
                                         ("in memory int4", {"quantize": "int4"})]
        for frac in (0.10, 0.25, 0.50, 0.99):
            cases.append((f"LRU {frac:.0%}", {"cache": int(frac * experts)}))
        cases += [("LFU 25%", {"cache": int(0.25 * experts), "policy": "lfu"}),
                  ("LRU+prefetch 25%", {"cache": int(0.25 * experts), "prefetch": True}),
                  ("int8 LRU 25%", {"cache": int(0.25 * experts), "quantize": "int8"}),
                  ("int4 LRU 25%", {"cache": int(0.25 * experts), "quantize": "int4"})]
        print(f"checkpoint: {layers} layers x {EXPERTS} experts (top-{TOP_K}), d_model {D_MODEL}, "
              f"{experts / 1e6:.0f} MB of fp32 experts; {tokens} timed decode tokens, {a.threads} thread(s), "
              f"{a.repeat} run(s) per case (median tok/s); "
              f"RSS baseline = after imports and a meta-device build")
        runs: dict[str, list[dict]] = {name: [] for name, _ in cases}
        for _ in range(a.repeat):
            for name, extra in cases:
                runs[name].append(run({**base, **extra}))
        results = {}
        for name, got in runs.items():
            results[name] = {**got[-1], "tok_s": statistics.median(r["tok_s"] for r in got),
                             "tok_s_runs": [r["tok_s"] for r in got]}
        ref = results["in memory fp32"]
        print("| case | cache MB | slots | tok/s | vs in-memory fp32 | peak RSS - baseline MB | resident MB | hit rate | "
              "prefetch recall | same tokens |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            cache = f"{r['cache_bytes'] / 1e6:.0f}" if "cache_bytes" in r else "-"
            same = r["tokens"] == ref["tokens"] if "int" not in name else "-"
            print(f"| {name} | {cache} | {r.get('slots', '-')} | {r['tok_s']:.1f} | {r['tok_s'] / ref['tok_s']:.2f} | "
                  f"{(r['peak_rss'] - r['base_rss']) / 1e6:.0f} | {r['resident'] / 1e6:.0f} | "
                  f"{r['hit_rate']:.2f} | " if "hit_rate" in r else
                  f"| {name} | - | - | {r['tok_s']:.1f} | {r['tok_s'] / ref['tok_s']:.2f} | {(r['peak_rss'] - r['base_rss']) / 1e6:.0f} | "
                  f"{r['resident'] / 1e6:.0f} | - | ", end="")
            print(f"{r['recall']:.2f} | {same} |" if r.get("recall") else f"- | {same} |")
        out = Path(__file__).parent / "results" / ("offload_quick.json" if a.quick else "offload.json")
        out.write_text(json.dumps({"experts_bytes": experts, "layers": layers, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
