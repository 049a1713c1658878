"""`moekit cache-sim TRACE --budget SIZE [SIZE ...]`: replay a routing trace against every expert-cache
policy and print hit rate and bytes read per token for each budget (`moekit.inference.cache_sim`)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.inference.cache_sim import SIM_POLICIES

    p.add_argument("trace", type=Path,
                   help="a routing trace (`moekit generate/serve --trace FILE`, `moekit analyze --trace FILE`)")
    p.add_argument("--budget", nargs="+", required=True, metavar="SIZE",
                   help="cache budgets: bytes, a size like 500MB or 2GiB, or a share of all routed experts "
                        "like 25%%")
    p.add_argument("--policy", nargs="+", choices=SIM_POLICIES, default=list(SIM_POLICIES),
                   help="policies to replay (default: all; belady is the optimum, a lower bound)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--model", type=Path, default=None,
                      help="the checkpoint the trace came from: expert sizes are read from its headers")
    size.add_argument("--expert-bytes", default=None, metavar="SIZE",
                      help="bytes of one expert (in a slot and per miss), instead of --model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="with --model: the dtype the experts are held in (default: the checkpoint's)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="with --model: experts quantized on load (smaller slots)")
    p.add_argument("--pin-fraction", type=float, default=0.5,
                   help="share of the slots the pinned policy keeps for the most used experts (default 0.5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")


def parse_budget(text: str, total: int) -> int:
    """Bytes of a --budget value: a size, or a percentage of `total` (every routed expert)."""
    from moekit.hf.io import parse_size

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if match:
        share = float(match.group(1))
        if not 0 < share <= 100:
            raise ValueError(f"--budget {text!r} is invalid: a share must be in (0, 100]%")
        return int(total * share / 100)
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"--budget {text!r} is invalid: use bytes, a size like 500MB or 2GiB, or a share "
                         f"like 25%") from None


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.trace import RoutingTrace
    from moekit.hf.io import parse_size
    from moekit.inference.cache_sim import layer_calls, replay

    if args.model is None and (args.dtype or args.quantize):
        raise ValueError("--dtype and --quantize describe the experts of --model; give --model PATH")
    trace = RoutingTrace.load(args.trace)
    if args.model is not None:
        from moekit.inference.offload import expert_sizes

        sizes = expert_sizes(args.model, dtype=args.dtype, quantize=args.quantize)
        for lt in trace.layers:
            if sizes.num_experts.get(lt.layer) != lt.num_experts:
                raise ValueError(f"{args.trace}: MoE layer {lt.layer} has {lt.num_experts} experts, but in "
                                 f"{args.model} it has {sizes.num_experts.get(lt.layer, 'none (not an MoE layer)')}; "
                                 f"the trace comes from another model")
        slot_bytes, read_bytes = sizes.slot_bytes, dict(sizes.read_bytes)
    else:
        try:
            slot_bytes = parse_size(args.expert_bytes)
        except ValueError:
            raise ValueError(f"--expert-bytes {args.expert_bytes!r} is invalid: use bytes or a size like "
                             f"12MB") from None
        read_bytes = slot_bytes  # type: ignore[assignment]
    total = slot_bytes * sum(lt.num_experts for lt in trace.layers)
    budgets = [parse_budget(b, total) for b in args.budget]
    results = replay(trace, budgets, slot_bytes=slot_bytes, read_bytes=read_bytes, policies=tuple(args.policy),
                     pin_fraction=args.pin_fraction)
    if args.json:
        for r in results:
            print(json.dumps({"budget": r.budget, "slots": r.slots, "policy": r.policy, "hits": r.hits,
                              "misses": r.misses, "hit_rate": r.hit_rate, "bytes_read": r.bytes_read,
                              "bytes_per_token": r.bytes_per_token, "tokens": r.tokens}))
        return 0
    calls = layer_calls(trace)
    experts = sum(lt.num_experts for lt in trace.layers)
    per_miss = read_bytes if isinstance(read_bytes, int) else max(read_bytes.values())
    print(f"{args.trace}: {trace.num_tokens} tokens, {len(calls)} MoE layer calls, {len(trace.layers)} MoE layers, "
          f"{experts} routed experts; one expert {slot_bytes / 1e6:.2f} MB in a slot, {per_miss / 1e6:.2f} MB "
          f"read per miss; all experts {total / 1e6:.1f} MB"
          + ("" if trace.step_N is not None else " (no step_N: each token replayed as its own forward)"))
    print("| budget MB | slots | % of experts | policy | hit rate | misses | MB read per token |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.budget / 1e6:.1f} | {r.slots} | {min(r.slots, experts) / experts:.0%} | {r.policy} | "
              f"{r.hit_rate:.4f} | {r.misses} | {r.bytes_per_token / 1e6:.3f} |")
    if any(r.slots >= experts for r in results):
        print("a budget that holds every routed expert needs no offloading: from_pretrained loads the model in "
              "memory (the replay shows only the first read of each expert)")
    return 0
