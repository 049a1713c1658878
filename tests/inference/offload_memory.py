"""Peak resident memory of offloaded decoding, measured in a fresh process.

`python -m tests.inference.offload_memory build DIR --mb 500` writes a Mixtral-layout checkpoint
with about that many MB of fp32 routed experts; `... measure DIR --cache 100MB [--in-memory]`
decodes from it and prints JSON: the child's peak RSS (VmHWM), its RSS after imports, the resident
(non-expert) weight bytes and the cache's bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

D_MODEL, EXPERTS, VOCAB = 512, 8, 1024


def build(path: Path, mb: float) -> dict:
    import torch

    from moekit.hf.families import FAMILIES
    from moekit.model.transformer import MoETransformer

    per_layer = EXPERTS * 3 * D_MODEL * 2 * D_MODEL * 4
    layers = max(2, round(mb * 1e6 / per_layer))
    hf = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=layers,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
              num_local_experts=EXPERTS, num_experts_per_tok=2)
    torch.manual_seed(0)
    with torch.no_grad():
        MoETransformer(FAMILIES["mixtral"].to_moekit(hf)).save_pretrained(str(path), model_type="mixtral")
    return {"layers": layers, "expert_bytes": layers * per_layer}


def _peak() -> int:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: Linux carries ru_maxrss across execve,
    so a child started by a large parent (pytest) would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(path: Path, cache: str, in_memory: bool, steps: int) -> dict:
    import torch

    import moekit
    from moekit.hf.families import FAMILIES
    from moekit.hf.io import read_config

    torch.set_num_threads(1)
    with torch.device("meta"):  # warm-up: one-off lazy initialisation inside torch (about 70 MB here)
        moekit.MoETransformer(FAMILIES["mixtral"].to_moekit(read_config(path)))
    base = _peak()
    if in_memory:
        model = moekit.from_pretrained(path)
    else:
        model = moekit.from_pretrained(path, offload_experts=True, expert_cache=cache)
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.arange(4).view(1, 4)
    kv = model.new_cache()
    with torch.no_grad():
        logits = model(tokens, cache=kv).logits
        for _ in range(steps):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=kv).logits
    out = {"peak": _peak(), "base": base, "resident_bytes": resident}
    if not in_memory:
        out["cache_bytes"] = model.expert_cache.nbytes
        out["stats"] = model.expert_cache.stats.summary()
    return out


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.inference.offload_memory", *args], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["build", "measure"])
    p.add_argument("path", type=Path)
    p.add_argument("--mb", type=float, default=500)
    p.add_argument("--cache", default="100MB")
    p.add_argument("--in-memory", action="store_true")
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    result = build(a.path, a.mb) if a.mode == "build" else measure(a.path, a.cache, a.in_memory, a.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
