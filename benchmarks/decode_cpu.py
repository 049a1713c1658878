"""Decode cost in CPU time, for a machine other jobs keep busy: this thread's CPU seconds
(`time.thread_time`, one thread) count only the work done, not the waits for a core, so moekit and
transformers compare far more steadily than by wall-clock there (memory-bandwidth contention still
shows). On the checkpoint `benchmarks/decode.py --dir DIR` builds:

    nice -n 10 python benchmarks/decode_cpu.py --dir /tmp/bench-model [--dtype bfloat16] [--prompt 512]

prints the prefill and the median batch-1 decode step, moekit vs transformers interleaved, and the
engine's generated tokens per CPU second at 1 and 16 concurrent requests (32-token prompts).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from decode import engine_throughput  # benchmarks/decode.py, beside this script


def step_cpu(model, hf, prompt: int, steps: int) -> tuple[float, float, float, float]:
    """(moekit prefill, transformers prefill, moekit step, transformers step) CPU seconds."""
    from moekit.model.cache import SlotStore

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    tok = ids[:, -1:]
    with torch.inference_mode():
        t = time.thread_time()
        pkv = hf(ids, use_cache=True).past_key_values
        hf_pre = time.thread_time() - t
        store, slot = SlotStore(model.config.n_layers, 1, prompt + steps + 1), torch.tensor([0])
        t = time.thread_time()
        model(ids, cache=store.view(slot, torch.tensor([0])), logits_to_keep=1)
        mk_pre = time.thread_time() - t
        hf_t, mk_t = [], []
        for i in range(steps):
            t = time.thread_time()
            pkv = hf(tok, past_key_values=pkv, use_cache=True).past_key_values
            hf_t.append(time.thread_time() - t)
            t = time.thread_time()
            model(tok, cache=store.view(slot, torch.tensor([prompt + i])), logits_to_keep=1)
            mk_t.append(time.thread_time() - t)
    return mk_pre, hf_pre, statistics.median(mk_t), statistics.median(hf_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="a checkpoint from benchmarks/decode.py --dir")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--new", type=int, default=16, help="tokens per request in the engine runs")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    from moekit.inference import load

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=getattr(torch, args.dtype)).eval()
    loaded = dataclasses.replace(load(args.dir, dtype=args.dtype), eos_ids=frozenset())
    mk_pre, hf_pre, mk, hf_step = step_cpu(loaded.model, hf, args.prompt, args.steps)
    print(f"{args.dtype}, {args.prompt}-token prompt, CPU ms (1 thread): prefill moekit {mk_pre * 1e3:.0f} vs "
          f"transformers {hf_pre * 1e3:.0f} ({hf_pre / mk_pre:.2f}x); decode step, median of {args.steps}: "
          f"moekit {mk * 1e3:.1f} vs transformers {hf_step * 1e3:.1f} ({hf_step / mk:.2f}x)", flush=True)
    if not args.skip_engine:
        one, sixteen = (engine_throughput(loaded, c, 32, args.new, clock=time.thread_time) for c in (1, 16))
        print(f"engine tokens per CPU second, {args.new} new each: 1 concurrent {one:.1f}, 16 concurrent "
              f"{sixteen:.1f} ({sixteen / one:.2f}x of one)", flush=True)


if __name__ == "__main__":
    main()
