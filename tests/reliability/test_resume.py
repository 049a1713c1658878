"""Resume bookkeeping: metrics equal an uninterrupted run's, changed settings, crash leftovers, full disks."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from moekit.train import checkpoint as ckpt
from moekit.train.metrics import TIMING_KEYS, MetricsLog, read_metrics
from moekit.train.runfolder import StorageError
from moekit.train.trainer import NonFiniteLossError

from ..train.helpers import make_trainer


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    make_trainer(out, steps=4, checkpoint_every=2, eval_every=2).fit()
    return _rows(out)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run folder after 2 of 4 steps (checkpoint 2), trained once and copied by each test."""
    out = tmp_path_factory.mktemp("two_steps")
    make_trainer(out, steps=2, checkpoint_every=2, eval_every=2).fit()
    return out


def _copy(run, to):
    shutil.copytree(run, to, dirs_exist_ok=True)
    return to


def _die_at(trainer, monkeypatch, step):
    real = trainer.train_step

    def dying():
        if trainer.step == step:
            raise KeyboardInterrupt("killed")
        return real()

    monkeypatch.setattr(trainer, "train_step", dying)


@pytest.mark.parametrize("kill_step", [pytest.param(1, id="before-first-checkpoint"),
                                       pytest.param(3, id="after-a-checkpoint")])
def test_resumed_metrics_equal_an_uninterrupted_run(tmp_path, monkeypatch, straight, kill_step):
    first = make_trainer(tmp_path, steps=4, checkpoint_every=2, eval_every=2)
    _die_at(first, monkeypatch, kill_step)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == kill_step
    # A new trainer, as a new process builds it: the same seeded init (which a run without a
    # checkpoint must start from again) and the checkpoint's tensors when there is one.
    make_trainer(tmp_path, steps=4, checkpoint_every=2, eval_every=2).fit(resume=True)
    assert _rows(tmp_path) == straight


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys, straight, two_steps):
    _copy(two_steps, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')  # killed while appending step 3
    make_trainer(tmp_path, steps=4, checkpoint_every=2, eval_every=2).fit(resume=True)
    assert "dropped the torn last line" in capsys.readouterr().out
    assert _rows(tmp_path) == straight


def test_a_damaged_line_before_the_end_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
        MetricsLog(path).truncate_after(1)
    assert path.read_text() == '{"step": 1}\n{"step": 2, oops\n{"step": 3}\n'


def _state(out, step):
    return json.loads((out / "checkpoints" / ckpt.checkpoint_name(step) / "state.json").read_text())


def test_changed_optimizer_settings_are_applied_said_and_recorded(tmp_path, capsys, two_steps):
    _copy(two_steps, tmp_path)  # trained with lr 1e-2, weight_decay 0.1, beta2 0.95
    resumed = make_trainer(tmp_path, steps=4, checkpoint_every=2, eval_every=2, weight_decay=0.9, lr=3e-2,
                           beta2=0.9)
    resumed.fit(resume=True)
    note = capsys.readouterr().out
    assert "changed settings, applied from step 2 on" in note
    for said in ("lr 0.01 -> 0.03", "weight_decay 0.1 -> 0.9", "beta2 0.95 -> 0.9", "steps 2 -> 4"):
        assert said in note, said
    decay, skip = resumed.optimizer.param_groups
    assert decay["weight_decay"] == 0.9 and skip["weight_decay"] == 0.0  # what ran
    assert decay["betas"] == (0.9, 0.9) and skip["betas"] == (0.9, 0.9)
    state = _state(tmp_path, 4)
    assert state["train_config"]["weight_decay"] == 0.9
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.9, 0.0]
    assert state["settings_history"] == [{"from_step": 2, "changed": {
        "steps": [2, 4], "lr": [0.01, 0.03], "weight_decay": [0.1, 0.9], "beta2": [0.95, 0.9]}}]
    assert read_metrics(tmp_path / "metrics.jsonl")[2]["lr"] == pytest.approx(0.03, rel=0.5)


@pytest.mark.parametrize("change", [pytest.param({"batch_size": 2}, id="batch_size"),
                                    pytest.param({"seed": 1}, id="seed"),
                                    pytest.param({"grad_accum": 1}, id="grad_accum")])
def test_changed_data_settings_are_refused_and_change_nothing(tmp_path, change, two_steps):
    _copy(two_steps, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"trained with {next(iter(change))}=.*batches would differ"):
        make_trainer(tmp_path, steps=4, **change).fit(resume=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_stale_temporary_checkpoints_are_removed_on_the_next_start(tmp_path, capsys, two_steps):
    _copy(two_steps, tmp_path)
    dead = tmp_path / "checkpoints" / ".tmp-step_00000004-999999999"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    make_trainer(tmp_path, steps=3, checkpoint_every=2, eval_every=2).fit(resume=True)
    assert not dead.exists() and "removed" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] and \
        not list((tmp_path / "checkpoints").glob(".tmp-*"))


def _fail_writes(monkeypatch, code, *, after: int = 0):
    """Checkpoint file writes raise OSError(code) from the (after+1)-th one on, as a full disk does."""
    real = ckpt._write_file
    calls = []

    def write(path, data):
        calls.append(path)
        if len(calls) > after:
            path.write_bytes(data[: len(data) // 3])  # a partial file, as ENOSPC leaves it
            raise OSError(code, "simulated", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_file", write)


def test_full_disk_during_a_checkpoint_says_where_and_that_the_last_one_is_intact(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=2, checkpoint_every=1)
    _fail_writes(monkeypatch, errno.ENOSPC, after=5)  # checkpoint 1 (5 files) is written, 2 fails
    with pytest.raises(StorageError) as info:
        trainer.fit()
    message = str(info.value)
    assert "could not write checkpoint 2" in message and "the disk is full" in message
    assert ".tmp-step_00000002" in message  # where
    assert "last good checkpoint" in message and "step_00000001 is intact" in message
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial folder is gone
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints")[0].name == "step_00000001"


def test_full_disk_before_any_checkpoint_does_not_promise_one(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=1, checkpoint_every=1)
    _fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(StorageError, match="no checkpoint had been written yet") as info:
        trainer.fit()
    assert "intact" not in str(info.value)


def test_read_only_metrics_file_is_said_plainly(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=2, checkpoint_every=1)

    def read_only(record):
        if record["step"] == 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "metrics.jsonl"))
        MetricsLog.write(trainer.metrics, record)

    monkeypatch.setattr(trainer.metrics, "write", read_only)
    with pytest.raises(StorageError, match=r"append step 2's metrics .*permission denied.*step_00000001 is intact"):
        trainer.fit()


def test_non_finite_loss_before_any_checkpoint_does_not_promise_one(tmp_path, monkeypatch):
    import dataclasses

    trainer = make_trainer(tmp_path, steps=4, checkpoint_every=2)
    real = trainer._forward
    monkeypatch.setattr(trainer, "_forward",
                        lambda micro: dataclasses.replace(out := real(micro), loss=out.loss * float("nan")))
    with pytest.raises(NonFiniteLossError, match="no checkpoint has been written yet") as info:
        trainer.fit()
    assert "intact" not in str(info.value)
