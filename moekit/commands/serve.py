"""`moekit serve PATH`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.commands.generate import add_parallel_argument, add_weight_arguments, weight_options

if TYPE_CHECKING:
    from moekit.inference.load import LoadedModel


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path,
                   help="model directory (Hugging Face layout) or a `moekit train` run folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (cache slots)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond those; more get HTTP 429")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per request, prompt + completion (default: the model's context, at most "
                        "4096); sizes the preallocated cache")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: the checkpoint's)")
    p.add_argument("--name", default=None, help="the model id clients send (default: the directory name)")
    add_weight_arguments(p)
    add_parallel_argument(p)


def run(args: argparse.Namespace) -> int:
    from moekit.parallel.serving import run_generation

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is invalid: must be in 1..65535")
    return run_generation(args.path, expert_parallel=args.expert_parallel, dtype=args.dtype,
                          weights=weight_options(args), lead=lambda loaded: _serve(args, loaded))


def _serve(args: argparse.Namespace, loaded: LoadedModel) -> int:
    import uvicorn

    from moekit.inference import Engine
    from moekit.inference.server import create_app

    max_len = args.max_len if args.max_len is not None else min(loaded.context_length, 4096)
    engine = Engine(loaded, max_batch_size=args.max_batch_size, max_len=max_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk)
    app = create_app(engine, name=args.name)
    print(f"serving {app.state.server.name} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch_size}, context {max_len})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
