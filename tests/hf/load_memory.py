"""Peak memory of `moekit.from_pretrained` vs the checkpoint size, measured in a fresh process.

Run: `python -m tests.hf.load_memory --mb 200` (prints JSON). The test suite runs it small.
RSS is sampled every millisecond in a thread (VmRSS: anonymous plus mapped file pages), above a
baseline taken after imports and a warm-up build of the model on the meta device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def make_checkpoint(path: Path, mb: float, *, d_model: int = 512) -> int:
    """A Mixtral-layout checkpoint of about `mb` megabytes (fp32); returns its size in bytes."""
    import torch

    from moekit.hf.families import mixtral
    from moekit.model.transformer import MoETransformer

    experts, vocab = 8, 4 * d_model
    per_layer = 4 * (experts * 3 * d_model * 2 * d_model + 3 * d_model * d_model)  # experts + attention
    layers = max(1, round((mb * 1e6 - 8 * vocab * d_model) / per_layer))
    hf = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
              num_local_experts=experts, num_experts_per_tok=2)
    with torch.no_grad():
        MoETransformer(mixtral.to_moekit(hf)).save_pretrained(str(path), model_type="mixtral")
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path, mode: str) -> dict:
    """In this process: peak RSS growth while loading `path` by `mode` ("moekit" or "eager")."""
    import torch
    from safetensors.torch import load_file

    import moekit
    from moekit.hf.families import mixtral
    from moekit.hf.io import read_config

    config = mixtral.to_moekit(read_config(path))
    with torch.device("meta"):
        moekit.MoETransformer(config)  # warm-up: one-off lazy initialisation inside torch
    base = _rss()
    peak, done = [base], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    if mode == "moekit":
        model = moekit.from_pretrained(path)
    else:  # the eager way: a fully built model plus the whole state dict read into memory
        model = moekit.MoETransformer(config)
        state = {k: v.clone() for k, v in load_file(path / "model.safetensors").items()}
        del state
    done.set()
    thread.join()
    peak[0] = max(peak[0], _rss())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": mode, "peak_rss_growth": peak[0] - base, "param_bytes": params}


def run_in_subprocess(path: Path, mode: str) -> dict:
    cmd = [sys.executable, "-m", "tests.hf.load_memory", "--measure", str(path), "--mode", mode]
    out = subprocess.run(cmd,
                         check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=200.0)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="moekit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.mode)))
        return
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        size = make_checkpoint(Path(tmp), args.mb)
        for mode in ("moekit", "eager"):
            result = run_in_subprocess(Path(tmp), mode)
            result["checkpoint_bytes"] = size
            result["ratio"] = round(result["peak_rss_growth"] / size, 3)
            print(json.dumps(result))


if __name__ == "__main__":
    main()
