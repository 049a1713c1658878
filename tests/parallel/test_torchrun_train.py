"""`moekit train` under torchrun (gloo, CPU) trains exactly like one process, and resumes across layouts.

Run A: 1 process for 2 steps, then resumed on 4 processes (2 data-parallel x 2 expert-parallel) to step 3.
Run B: 2 processes (expert parallel 2) for 2 steps, then resumed on 1 process to step 3.
Every step's loss, gradient norm, validation loss and routing counts agree (fp32 round-off), and
so do the final weights: the 2-process steps equal the 1-process ones, and each cross-layout
resume continues as the other does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


@pytest.mark.slow
def test_torchrun_training_equals_one_process_and_resumes_on_another_layout(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, 2, 1, None)
    train(b, 2, 2, 2)
    train(a, 3, 4, 2, resume=True)
    train(b, 3, 1, None, resume=True)
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
