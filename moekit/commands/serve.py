"""`moekit serve PATH`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.commands.generate import add_parallel_argument, add_weight_arguments, weight_options

if TYPE_CHECKING:
    from moekit.inference.load import LoadedModel
    from moekit.inference.trace_recorder import TraceRecorder


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
    p.add_argument("--trace", type=Path, default=None, metavar="FILE",
                   help="record the routing trace of every request and write it to FILE when the server "
                        "stops (Ctrl-C / SIGTERM); `moekit cache-sim FILE` replays it")
    p.add_argument("--trace-max-tokens", type=int, default=1_000_000, metavar="N",
                   help="stop recording after N tokens (the trace is held in memory; default 1000000)")
    add_weight_arguments(p)
    add_parallel_argument(p)


def run(args: argparse.Namespace) -> int:
    from moekit.inference.trace_recorder import TraceRecorder, check_trace_path
    from moekit.parallel.serving import run_generation

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is invalid: must be in 1..65535")
    recorder = None
    if args.trace is not None:
        check_trace_path(args.trace)
        recorder = TraceRecorder(max_tokens=args.trace_max_tokens)
    return run_generation(args.path, expert_parallel=args.expert_parallel, dtype=args.dtype,
                          weights=weight_options(args), lead=lambda loaded: _serve(args, loaded, recorder))


def _serve(args: argparse.Namespace, loaded: LoadedModel, recorder: TraceRecorder | None) -> int:
    import uvicorn

    from moekit.inference import Engine
    from moekit.inference.server import create_app

    max_len = args.max_len if args.max_len is not None else min(loaded.context_length, 4096)
    engine = Engine(loaded, max_batch_size=args.max_batch_size, max_len=max_len, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, trace=recorder)
    app = create_app(engine, name=args.name)
    print(f"serving {app.state.server.name} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch_size}, context {max_len}; metrics at /metrics)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:  # uvicorn returns after a graceful shutdown (Ctrl-C, SIGTERM), the engine thread stopped
        if recorder is not None:
            save_trace(recorder, args.trace)
    return 0


def save_trace(recorder, path: Path) -> None:
    if recorder.num_tokens == 0:
        print(f"no request was served: no routing trace written to {path}")
        return
    recorder.save(path)
    cut = f" (stopped at --trace-max-tokens {recorder.max_tokens})" if recorder.truncated else ""
    print(f"routing trace of {recorder.num_tokens} tokens written to {path}{cut}")
