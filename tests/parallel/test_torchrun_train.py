"""`moekit train` under torchrun (gloo, CPU) trains exactly like one process, and resumes across layouts.

Run A: 1 process for 2 steps, then resumed on 4 processes (2 data-parallel x 2 expert-parallel) to step 3.
Run B: 2 processes (expert parallel 2) for 2 steps, each rank writing its own checkpoint shards,
then resumed on 4 processes (expert parallel 4) to step 3.
Every step's loss, gradient norm, validation loss and routing counts agree (fp32 round-off), and
so do the final weights: the 2-process steps equal the 1-process ones, and each cross-layout
resume continues as the other does. One process reads B's per-rank shards as the tensors of A's
one-process checkpoint; a flipped byte in a shard is caught by the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.train import checkpoint as ckpt

from ..train.helpers import FIXTURE
from .test_expert_parallel import free_port

FAST = ["--preset", "tiny", "--corpus", str(FIXTURE), "--vocab-size", "300", "--batch-size", "4",
        "--seq-len", "16", "--eval-every", "2", "--eval-sequences", "4", "--checkpoint-every", "2", "--quiet"]


def train(out: Path, steps: int, nproc: int, ep: int | None, *, resume: bool = False) -> None:
    argv = ["-m", "moekit", "train", "--out", str(out), "--steps", str(steps), *FAST]
    argv += ["--resume"] if resume else []
    argv += ["--expert-parallel", str(ep)] if ep else []
    if nproc > 1:
        argv = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((out / "final").glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def check_shards(one: Path, sharded: Path, scratch: Path) -> None:
    files = sorted(p.relative_to(sharded).as_posix() for p in sharded.rglob("*") if p.is_file())
    shards = [f for f in files if f.startswith("sharded/")]
    assert len(shards) == 2 and all(f.endswith(".safetensors") for f in shards), files  # one per rank
    assert sorted(set(files) - set(shards)) == ["manifest.json", "rng.safetensors", "state.json"], files
    assert set(json.loads((sharded / "manifest.json").read_text())["files"]) == set(files) - {"manifest.json"}
    full, _ = ckpt.read_checkpoint(one)
    read, _ = ckpt.read_checkpoint(sharded)
    for stem in ("model", "optimizer"):
        assert read[stem].keys() == full[stem].keys() and len(full[stem]) > 10, stem
        for name, t in full[stem].items():
            torch.testing.assert_close(read[stem][name], t, rtol=1e-4, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
    shutil.copytree(sharded, scratch)
    victim = scratch / shards[1]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert f"{shards[1]} does not match its sha256" in ckpt.verify_checkpoint(scratch)


@pytest.mark.slow
def test_torchrun_training_equals_one_process_and_resumes_on_another_layout(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, 2, 1, None)
    train(b, 2, 2, 2)
    check_shards(a / "checkpoints" / "step_00000002", b / "checkpoints" / "step_00000002", tmp_path / "bad")
    train(a, 3, 4, 2, resume=True)
    train(b, 3, 4, 4, resume=True)
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        for key in ("loss", "aux_loss", "grad_norm", "lr", "aux/load_balance"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
        assert ("val_loss" in x) == ("val_loss" in y) == (x["step"] != 1)
        if "val_loss" in x:
            assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
        assert [m["tokens_per_expert"] for m in x["moe"]] == [m["tokens_per_expert"] for m in y["moe"]]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert (b / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
