"""Real SIGKILLs of `moekit train` subprocesses, then resume: the run ends as if never interrupted.

Each test trains the same tiny run; one uninterrupted run is the reference. A killed-and-resumed
run must end with metrics.jsonl equal row for row (all but the wall-clock tokens/s) and the same
final weights and last checkpoint, bit for bit. CI runs a short campaign of 2 kills, one of them
while a second real `moekit train` process tries the same folder; `MOEKIT_KILL_CAMPAIGN=N` runs N
random kills, and `MOEKIT_KILL_SEED` picks another random sequence.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.train import checkpoint as ckpt
from moekit.train.metrics import TIMING_KEYS, read_metrics
from moekit.train.runfolder import LOCK_FILE

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare_mini"
KILLABLE = Path(__file__).with_name("killable_train.py")
STEPS, EVERY = 6, 2
CHECKPOINT_FILES = 5  # model, optimizer, rng, state, manifest
ARGS = ["--preset", "tiny", "--corpus", str(FIXTURE), "--vocab-size", "300", "--batch-size", "2",
        "--seq-len", "16", "--eval-every", "3", "--eval-sequences", "2", "--checkpoint-every", str(EVERY),
        "--steps", str(STEPS), "--quiet"]
CAMPAIGN = int(os.environ.get("MOEKIT_KILL_CAMPAIGN", "0"))
SEED = int(os.environ.get("MOEKIT_KILL_SEED", "0"))
TIMEOUT_S = 300


def _env(**extra: str) -> dict[str, str]:
    # One thread: the same arithmetic in every process, and less contention on a shared machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def train(out: Path, *extra: str, kill: str | None = None, resume: bool = True) -> subprocess.CompletedProcess:
    """`moekit train` into `out` (through the kill wrapper when `kill` names a point)."""
    argv = [*ARGS, "--out", str(out), *(["--resume"] if resume else []), *extra]
    cmd = [sys.executable, str(KILLABLE), *argv] if kill else [sys.executable, "-m", "moekit.cli", "train", *argv]
    return subprocess.run(cmd, env=_env(MOEKIT_TEST_KILL=kill or ""), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def last_good_step(out: Path) -> int:
    path, _ = ckpt.latest_checkpoint(out / "checkpoints")
    return 0 if path is None else int(path.name.split("_")[1])


def comparable_metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(out / "metrics.jsonl")]


def assert_same_run(out: Path, reference: Path) -> None:
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert comparable_metrics(out) == comparable_metrics(reference)
    last = ckpt.checkpoint_name(STEPS)
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert (out / "checkpoints" / last / name).read_bytes() == \
            (reference / "checkpoints" / last / name).read_bytes(), name
    ours, theirs = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert not list((out / "checkpoints").glob(".tmp-*")), "a stale temporary checkpoint survived"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    started = time.monotonic()
    result = train(out, resume=False)
    (out.parent / "seconds").write_text(str(time.monotonic() - started))
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    return out


def kill_point(rng: random.Random, resume_from: int, kind: str) -> str:
    """A kill point that the run resumed from step `resume_from` reaches for sure."""
    if kind == "metrics":
        return f"metrics:{rng.randint(resume_from + 1, STEPS)}"
    if kind == "ckpt":
        step = rng.choice(range(resume_from + EVERY, STEPS + 1, EVERY))
        return f"ckpt:{step}:{rng.randrange(CHECKPOINT_FILES)}"
    return f"step:{rng.randint(resume_from, STEPS - 1)}"


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_and_concurrent_runs_end_like_an_uninterrupted_one(tmp_path, reference):
    """Kill 1: a torn metrics line at step 1, before the first checkpoint. Kill 2: a run stopped
    halfway through a random file of a random checkpoint, while a second `moekit train` into the
    same folder is refused naming its PID; killed there, its stale lock must not block the resume."""
    rng = random.Random(SEED)
    out, ready = tmp_path / "run", tmp_path / "ready"
    first = train(out, kill="metrics:1", resume=False)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not (out / "metrics.jsonl").read_text().endswith("\n")  # really torn
    point = kill_point(rng, last_good_step(out), "ckpt")
    holder = subprocess.Popen([sys.executable, str(KILLABLE), *ARGS, "--out", str(out), "--resume"],
                              env=_env(MOEKIT_TEST_KILL=point, MOEKIT_TEST_PAUSE=str(ready)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ready.exists():
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, f"the run never reached {point}"
            time.sleep(0.2)
        before = _snapshot(out)
        second = train(out)  # --resume into the same folder while the first run is writing
        assert second.returncode == 2
        assert f"in use by another moekit process (PID {holder.pid}" in second.stderr
        assert _snapshot(out) == before  # the refused run changed nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=TIMEOUT_S)
    assert holder.returncode == -signal.SIGKILL
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # its lock file stays, stale
    assert list((out / "checkpoints").glob(".tmp-step_*")), f"{point} left no partial checkpoint"
    final = train(out)
    assert final.returncode == 0, final.stderr
    assert_same_run(out, reference)


@pytest.mark.skipif(CAMPAIGN == 0, reason="set MOEKIT_KILL_CAMPAIGN=N for a campaign of N random kills")
def test_random_kill_campaign(tmp_path, reference):
    """N kills, each at a random wrapper point or after a random time (uniform over one whole run).

    The kills come in chains on one run folder: a chain ends (resumed to the end and compared with
    the reference) once its run was killed after resuming from the last checkpoint before the end,
    and the next chain starts in a new folder, so the kills spread over the whole run.
    """
    rng = random.Random(SEED)
    duration = float((reference.parent / "seconds").read_text())
    log: list[str] = []
    chain = 0
    out = tmp_path / f"chain{chain}"
    for _ in range(CAMPAIGN):
        fresh = not (out / "tokenizer.json").exists()
        resume_from = last_good_step(out) if out.exists() else 0
        kind = rng.choice(["metrics", "ckpt", "step", "time"])
        if kind == "time":
            log.append(f"chain {chain}: " + timed_kill(out, rng.uniform(0.0, duration), fresh=fresh))
        else:
            point = kill_point(rng, resume_from, kind)
            result = train(out, kill=point, resume=not fresh)
            assert result.returncode == -signal.SIGKILL, f"{point}: exit {result.returncode}: {result.stderr}"
            log.append(f"chain {chain}: {point}: killed, resumes from step {last_good_step(out)}")
        if log[-1].endswith("finished") or resume_from == STEPS - EVERY:
            finish_and_compare(out, reference, log)
            chain += 1
            out = tmp_path / f"chain{chain}"
    if out.exists():
        finish_and_compare(out, reference, log)
    print("\n" + "\n".join(log))


def finish_and_compare(out: Path, reference: Path, log: list[str]) -> None:
    if not log[-1].endswith("finished"):
        final = train(out, resume=(out / "tokenizer.json").exists())
        assert final.returncode == 0, f"the resume after {log} failed: {final.stderr}"
    assert_same_run(out, reference)
    log.append("  -> resumed to the end: metrics, final weights and last checkpoint equal the reference")


def timed_kill(out: Path, seconds: float, *, fresh: bool) -> str:
    """Start `moekit train`, SIGKILL it after `seconds` (wherever it is); 'finished' if it ended first."""
    argv = [*ARGS, "--out", str(out), *([] if fresh else ["--resume"])]
    proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "train", *argv], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    if proc.returncode == 0:
        return f"SIGKILL after {seconds:.1f} s: finished"
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {err}"
    return f"SIGKILL after {seconds:.1f} s: killed, resumes from step {last_good_step(out)}"
