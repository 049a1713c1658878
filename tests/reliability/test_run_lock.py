"""The run-folder lock: the holder's PID in the refusal, a dead holder never blocks, compare's variants.

The test with two real `moekit train` processes is in test_kills.py (it shares the reference run).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from moekit.train.runfolder import LOCK_FILE, RunFolderBusy, RunLock



def _hold_lock_in_another_process(folder):
    """A second process that takes `folder`'s lock the way RunLock does and holds it until killed."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(folder / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode()); print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_names_the_holder_and_is_free_again_after_it_dies(tmp_path):
    tmp_path.joinpath(LOCK_FILE).write_text("999999999\n")  # a stale lock file: blocks nothing
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    other = _hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunFolderBusy, match=f"PID {other.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    with RunLock(tmp_path):
        pass


def test_compare_variant_folder_is_locked_too(tmp_path):
    from dataclasses import replace

    from moekit.train.compare import DEFAULT_TRAIN, CompareConfig, run_compare

    from ..train.helpers import FIXTURE

    run_dir = tmp_path / "runs" / "dense"
    run_dir.mkdir(parents=True)
    other = _hold_lock_in_another_process(run_dir)
    train = replace(DEFAULT_TRAIN, steps=1, batch_size=2, seq_len=16, warmup_steps=1, eval_every=1,
                    eval_sequences=2)
    config = CompareConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, active_d_ff=32, num_experts=4,
                           train=train)
    try:
        with pytest.raises(RunFolderBusy, match=f"PID {other.pid}"):
            run_compare(config, variants=["dense"], out_dir=tmp_path, corpus=FIXTURE, progress=False)
    finally:
        other.kill()
        other.wait()
    assert not (run_dir / "metrics.jsonl").exists()


def test_lock_on_a_new_folder_that_fails_leaves_no_folder(tmp_path):
    folder = tmp_path / "new"
    with pytest.raises(ZeroDivisionError):
        with RunLock(folder):
            1 / 0
    assert not folder.exists()
    with pytest.raises(ValueError, match="is a file"):
        (tmp_path / "f").write_text("x")
        RunLock(tmp_path / "f").acquire()


def test_a_read_only_run_folder_is_said_plainly(tmp_path, monkeypatch, capsys):
    from moekit.cli import main

    from ..train.helpers import FIXTURE

    (tmp_path / "run").mkdir()
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["train", "--out", str(tmp_path / "run"), "--corpus", str(FIXTURE), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"could not create the run folder's lock file {tmp_path / 'run' / LOCK_FILE}" in err
    assert "the file system is read-only [EROFS]" in err and "nothing in" in err
    assert "Traceback" not in err
