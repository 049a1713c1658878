"""`moekit generate PATH --prompt TEXT`: stream one completion to the terminal, then the speed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


def run(args: argparse.Namespace) -> int:
    from moekit.inference import generate, load

    loaded = load(args.path, dtype=args.dtype)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if not args.chat:
        show(args.prompt)
    result = generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                      chat=args.chat, on_text=show)
    print()
    print(f"[{len(result.prompt_ids)} prompt tokens, {result.prompt_tokens_per_s:.1f} tokens/s; "
          f"{len(result.token_ids)} generated tokens, {result.generated_tokens_per_s:.1f} tokens/s; "
          f"finished: {result.finish_reason}]", file=sys.stderr)
    return 0
