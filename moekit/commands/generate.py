"""`moekit generate PATH --prompt TEXT`: stream one completion to the terminal, then the speed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.inference.load import LoadedModel
    from moekit.inference.trace_recorder import TraceRecorder


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.inference.sampling import SamplingParams  # torch: only when this command is chosen

    defaults = SamplingParams()
    p.add_argument("path", type=Path,
                   help="model directory (Hugging Face layout) or a `moekit train` run folder")
    p.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user message)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 keeps every token")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="strings that end the completion")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: the checkpoint's)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--trace", type=Path, default=None, metavar="FILE",
                   help="write the routing trace (layer, token, experts) of the run to FILE (safetensors, "
                        "moekit.analysis.trace's format; `moekit cache-sim FILE` replays it)")
    add_weight_arguments(p)
    add_parallel_argument(p)


def add_parallel_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-parallel", type=int, default=None, metavar="EP",
                   help="split the experts over EP ranks (launch with torchrun --nproc-per-node EP; "
                        "rank 0 generates, the others run their experts)")


def add_weight_arguments(p: argparse.ArgumentParser) -> None:
    """How the weights are held: in memory, routed experts offloaded to the files, quantized."""
    p.add_argument("--offload-experts", action="store_true",
                   help="keep routed experts in the checkpoint files and read them on demand (needs --expert-cache)")
    p.add_argument("--expert-cache", default=None, metavar="SIZE",
                   help="byte budget of the offloaded-expert cache, e.g. 2GB or 500MB")
    p.add_argument("--expert-policy", choices=("lru", "lfu"), default=None,
                   help="which cached expert to evict first (default lru)")
    p.add_argument("--prefetch", action="store_true",
                   help="prefetch the next layer's experts predicted by its router (with --offload-experts)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantized experts (int8 per channel, int4 in groups of 32)")


def weight_options(args: argparse.Namespace) -> dict:
    """`moekit.from_pretrained`'s keywords for the flags of `add_weight_arguments` that were given."""
    options: dict = {}
    if args.offload_experts:
        options["offload_experts"] = True
    if args.expert_cache is not None:
        options["expert_cache"] = args.expert_cache
    if args.expert_policy is not None:
        options["policy"] = args.expert_policy
    if args.prefetch:
        options["prefetch"] = True
    if args.quantize is not None:
        options["quantize"] = args.quantize
    return options


def run(args: argparse.Namespace) -> int:
    from moekit.inference.trace_recorder import TraceRecorder, check_trace_path
    from moekit.parallel.serving import run_generation

    recorder = None
    if args.trace is not None:
        check_trace_path(args.trace)
        recorder = TraceRecorder()
    return run_generation(args.path, expert_parallel=args.expert_parallel, dtype=args.dtype,
                          weights=weight_options(args), lead=lambda loaded: _generate(args, loaded, recorder))


def _generate(args: argparse.Namespace, loaded: LoadedModel, recorder: TraceRecorder | None) -> int:
    from moekit.inference import generate

    # The prompt is echoed once generation has started, so that a refused request (its error on
    # stderr) does not print half a line first.
    echo = [] if args.chat else [args.prompt]

    def show(text: str) -> None:
        sys.stdout.write("".join(echo) + text)
        sys.stdout.flush()
        echo.clear()

    result = generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                      chat=args.chat, on_text=show, trace=recorder)
    if echo:  # no text was generated (EOS at once)
        show("")
    print()
    print(f"[{len(result.prompt_ids)} prompt tokens, {result.prompt_tokens_per_s:.1f} tokens/s; "
          f"{len(result.token_ids)} generated tokens, {result.generated_tokens_per_s:.1f} tokens/s; "
          f"finished: {result.finish_reason}]", file=sys.stderr)
    cache = getattr(loaded.model, "expert_cache", None)
    if cache is not None:
        stats = cache.stats
        print(f"[expert cache: {stats.hits} hits, {stats.misses} misses ({stats.hit_rate:.1%} hit rate), "
              f"{stats.bytes_read / 1e6:.1f} MB read]", file=sys.stderr)
    if recorder is not None:
        recorder.save(args.trace)
        print(f"[routing trace of {recorder.num_tokens} tokens written to {args.trace}]", file=sys.stderr)
    return 0
