"""Decoding speed, side by side in one run: moekit vs transformers `generate` on the same locally
built Hugging Face checkpoint (random Mixtral-shaped: hidden 512, 8 layers, 8 experts top-2 of
width 1024, vocab 32000; 139M parameters), batch 1, fp32 and bf16; the batching engine's aggregate
throughput at 1/4/16 concurrent requests; and the memory-bandwidth limit of a decode step.

    nice -n 10 python benchmarks/decode.py [--prompt 512] [--new 128] [--threads 2] [--repeats 1]
        [--llama-cpp-src llama_cpp_python-0.3.36]

With llama-cpp-python, sentencepiece and protobuf installed and `--llama-cpp-src` (or
$LLAMA_CPP_SRC) naming the unpacked llama-cpp-python sdist, the same checkpoint is converted to GGUF
(f32, bf16, q8_0; benchmarks/llamacpp.py) and llama.cpp is timed on the same prompt ids, interleaved
with the others; without them the benchmark prints how to set it up. Figures are medians of
--repeats runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from llamacpp import (  # benchmarks/llamacpp.py, beside this script
    ISSUE_LLAMA_CPP,
    SAME_PRECISION,
    leading_agreement,
    llama_speed,
    load_gguf,
    prepare,
)


def build_checkpoint(path: Path, *, vocab: int = 32000) -> None:
    import transformers
    from tokenizers import Tokenizer, models

    config = transformers.MixtralConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1024,
                                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                        num_local_experts=8, num_experts_per_tok=2,
                                        max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.save(str(path / "tokenizer.json"))


def active_bytes(model, rows: int = 1) -> float:
    """Bytes a decode step of `rows` sequences reads: every weight except the embedding table (one
    row per sequence) and the experts no sequence selected. With one row, exactly top_k of
    num_experts per MoE layer; with more, the expected number of distinct experts when each row
    picks top_k of them uniformly, E (1 - (1 - k / E)^rows) (a random model routes about so)."""
    moe = model.config.moe
    total = 0.0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight" and not model.config.tie_embeddings:
            total += rows * p.shape[1] * p.element_size()
        elif ".experts." in name and p.dim() == 3:
            E, k = moe.num_experts, moe.top_k
            used = k if rows == 1 else E * (1 - (1 - k / E) ** rows)
            total += p.numel() * p.element_size() * used / E
        else:
            total += p.numel() * p.element_size()
    return total


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted once each, as STREAM's copy)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def hf_speed(hf_model, ids: list[int], new: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of transformers generate, greedy, no EOS stop."""
    x = torch.tensor([ids])
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        t = time.perf_counter()
        hf_model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        hf_model.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
        full = time.perf_counter() - t
    return len(ids) / prefill, (new - 1) / max(full - prefill, 1e-9)


def moekit_speed(loaded, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prompt tokens/s, decode tokens/s, tokens) of moekit's greedy generate."""
    from moekit.inference import generate

    out = generate(loaded, ids, max_new_tokens=new, temperature=0)
    assert len(out.token_ids) == new
    return out.prompt_tokens_per_s, out.generated_tokens_per_s, out.token_ids


def medians(runs: list[tuple]) -> list[float]:
    """Per-field medians of (prefill tok/s, decode tok/s, ...) runs: the first two fields."""
    return [statistics.median(r[i] for r in runs) for i in (0, 1)]


def llama_cpp_row(runs: list[tuple[float, float, list[int]]], moekit: list[float] | None,
                  limit: float | None, label: str) -> dict:
    """Print and return llama.cpp's medians at one GGUF type, with moekit / llama.cpp ratios at the
    same precision and the share of the bandwidth limit where there is one."""
    ll = medians(runs)
    row = {"prefill": ll[0], "decode": ll[1]}
    line = f"llama.cpp {label}: prefill tok/s {ll[0]:.0f}, decode tok/s {ll[1]:.1f}"
    if moekit is not None:
        row |= {"moekit_vs_llama_cpp_prefill": moekit[0] / ll[0], "moekit_vs_llama_cpp_decode": moekit[1] / ll[1]}
        line += (f"; moekit / llama.cpp: prefill {row['moekit_vs_llama_cpp_prefill']:.2f}x, "
                 f"decode {row['moekit_vs_llama_cpp_decode']:.2f}x")
    if limit is not None:
        row["bandwidth_share"] = ll[1] / limit
        line += f"; llama.cpp at {ll[1] / limit:.0%} of the bandwidth limit"
    print(line)
    return row


def step_times(hf_model, loaded, ids: list[int], steps: int) -> tuple[float, float]:
    """Median seconds of one batch-1 decode forward (after the prompt), transformers and moekit
    alternating step by step, so both see the same machine load: the steadiest figure on a busy
    machine."""
    from moekit.model.cache import SlotStore

    model = loaded.model
    x = torch.tensor([ids])
    tok = torch.tensor([[ids[-1]]])
    with torch.inference_mode():
        pkv = hf_model(x, use_cache=True).past_key_values
        store = SlotStore(model.config.n_layers, 1, len(ids) + steps + 1)
        slot = torch.tensor([0])
        model(x, cache=store.view(slot, torch.tensor([0])), logits_to_keep=1)
        hf_t, mk_t = [], []
        for i in range(steps):
            t = time.perf_counter()
            pkv = hf_model(tok, past_key_values=pkv, use_cache=True).past_key_values
            hf_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            model(tok, cache=store.view(slot, torch.tensor([len(ids) + i])), logits_to_keep=1)
            mk_t.append(time.perf_counter() - t)
    return statistics.median(hf_t), statistics.median(mk_t)


def engine_throughput(loaded, concurrent: int, prompt: int, new: int, clock=time.perf_counter) -> float:
    """Generated tokens per second of `clock` (wall clock; `time.thread_time` for CPU time) over
    all requests when `concurrent` requests run at once."""
    from moekit.inference import Engine, Request, SamplingParams

    engine = Engine(loaded, max_batch_size=concurrent, max_len=prompt + new, prefill_chunk=256)
    gen = torch.Generator().manual_seed(concurrent)
    vocab = loaded.model.config.vocab_size
    requests = [Request(prompt_ids=torch.randint(0, vocab, (prompt,), generator=gen).tolist(),
                        params=SamplingParams(max_new_tokens=new, temperature=0)) for _ in range(concurrent)]
    t = clock()
    for r in requests:
        engine.submit(r)
    while not all(r.done for r in requests):
        engine.step()
    return sum(len(r.output_ids) for r in requests) / (clock() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=21, help="decode steps of the interleaved step timing")
    parser.add_argument("--skip-engine", action="store_true", help="leave out the concurrency throughput")
    parser.add_argument("--dir", type=Path, default=None, help="reuse / keep the checkpoint here")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--llama-cpp-src", type=Path, default=None,
                        help="the unpacked llama-cpp-python sdist (holds convert_hf_to_gguf.py); or $LLAMA_CPP_SRC")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from moekit.inference import load

    folder = args.dir or Path(tempfile.mkdtemp(prefix="moekit-decode-"))
    if not (folder / "config.json").is_file():
        build_checkpoint(folder)
    gguf = prepare(folder, args.llama_cpp_src, vocab=32000)  # None: llama.cpp not set up here
    llama: dict = {"installed": gguf is not None}
    ids = torch.randint(0, 32000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    results: dict = {"prompt": args.prompt, "new": args.new, "threads": args.threads}
    bandwidth = copy_bandwidth()
    results["copy_GBps"] = bandwidth / 1e9
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads")
    for dtype in ("float32", "bfloat16"):
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        hf_model = hf_model.eval()
        loaded = load(folder, dtype=dtype)
        loaded = dataclasses.replace(loaded, eos_ids=frozenset())  # always `new` tokens, like min_new_tokens
        llm = load_gguf(gguf[SAME_PRECISION[dtype]], threads=args.threads,
                        n_ctx=args.prompt + args.new) if gguf else None
        hf_runs, mk_runs, ll_runs = [], [], []
        for _ in range(args.repeats):  # interleaved, so all see the same machine load
            hf_runs.append(hf_speed(hf_model, ids, args.new))
            mk_runs.append(moekit_speed(loaded, ids, args.new))
            if llm is not None:
                ll_runs.append(llama_speed(llm, ids, args.new))
        hf, mk = medians(hf_runs), medians(mk_runs)
        active = active_bytes(loaded.model)
        limit = bandwidth / active
        hf_step, mk_step = step_times(hf_model, loaded, ids, args.steps)
        row = {"hf_prefill": hf[0], "hf_decode": hf[1], "moekit_prefill": mk[0], "moekit_decode": mk[1],
               "bandwidth_limit": limit, "active_MB": active / 1e6,
               "hf_step_ms": hf_step * 1e3, "moekit_step_ms": mk_step * 1e3}
        print(f"{dtype}: one decode step, interleaved, median of {args.steps}: moekit "
              f"{mk_step * 1e3:.1f} ms vs transformers {hf_step * 1e3:.1f} ms ({hf_step / mk_step:.2f}x)")
        print(f"{dtype}: prefill tok/s moekit {mk[0]:.0f} vs transformers {hf[0]:.0f} "
              f"({mk[0] / hf[0]:.2f}x); "
              f"decode tok/s moekit {mk[1]:.1f} vs transformers {hf[1]:.1f} ({mk[1] / hf[1]:.2f}x); "
              f"bandwidth limit {limit:.0f} tok/s ({row['active_MB']:.0f} MB active), moekit at "
              f"{mk[1] / limit:.0%}")
        if dtype == "float32" and not args.skip_engine:
            tput = {c: engine_throughput(loaded, c, 32, 64) for c in (1, 4, 16)}
            row["engine_throughput"] = tput
            ceiling = {c: c * active / active_bytes(loaded.model, c) for c in tput}
            row["engine_bandwidth_ceiling"] = ceiling
            print("engine aggregate tok/s (32-token prompts, 64 new each): " + ", ".join(
                f"{c} concurrent {v:.0f} ({v / tput[1]:.1f}x)" for c, v in tput.items()))
            print("  a step of c sequences reads more experts: at the bandwidth limit c concurrent would "
                  "reach at most " + ", ".join(f"{x:.1f}x" for x in ceiling.values()) + " of one")
        if llm is not None:
            llama[SAME_PRECISION[dtype]] = llama_cpp_row(ll_runs, mk, limit, SAME_PRECISION[dtype])
            if dtype == "float32":  # the same model? random weights can tie, so a count, not an assert
                agree = leading_agreement(mk_runs[0][2], ll_runs[0][2])
                llama["greedy_agreement_f32"] = {"leading_tokens_equal": agree, "of": args.new}
                print(f"greedy tokens: llama.cpp f32 equals moekit fp32 for the first {agree} of {args.new}")
        results[dtype] = row
        del hf_model, loaded, llm
    if gguf is not None:  # q8_0 has no moekit twin: alone, after the others
        llm = load_gguf(gguf["q8_0"], threads=args.threads, n_ctx=args.prompt + args.new)
        llama["q8_0"] = llama_cpp_row([llama_speed(llm, ids, args.new) for _ in range(args.repeats)],
                                      None, None, "q8_0")
        llama["gguf_MB"] = {t: path.stat().st_size / 1e6 for t, path in gguf.items()}
    else:
        llama["issue_11_decode_tok_s"] = ISSUE_LLAMA_CPP
    results["llama_cpp"] = llama
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
