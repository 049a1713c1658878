"""Process layouts that do not fit are refused before any work, with the numbers in the message."""

from __future__ import annotations

import pytest

from moekit.cli import main
from moekit.parallel import check_launch

from ..train.helpers import FIXTURE

TORCHRUN = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("kwargs, env, message", [
    pytest.param(dict(expert_parallel=2, num_experts=4, batch_size=4), {},
                 "--expert-parallel 2 needs 2 or a multiple of 2 processes; launch with torchrun",
                 id="no-torchrun"),
    pytest.param(dict(expert_parallel=3, num_experts=6, batch_size=12), TORCHRUN,
                 "world size 4 is not divisible by --expert-parallel 3", id="world-not-divisible"),
    pytest.param(dict(expert_parallel=4, num_experts=6, batch_size=8), TORCHRUN,
                 "num_experts=6 is not divisible by --expert-parallel 4", id="experts-not-divisible"),
    pytest.param(dict(expert_parallel=2, num_experts=4, batch_size=6), TORCHRUN,
                 "--batch-size 6 (the global batch) does not split over 4 processes",
                 id="batch-not-divisible"),
    pytest.param(dict(expert_parallel=0, num_experts=4, batch_size=8), TORCHRUN,
                 "--expert-parallel 0 is invalid", id="ep-zero"),
    pytest.param(dict(expert_parallel=2, num_experts=None, batch_size=8), TORCHRUN,
                 "needs a model with MoE layers", id="dense-model"),
])
def test_bad_layout_is_a_clear_error(kwargs, env, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_launch(**kwargs, env=env)


def test_good_layouts_pass() -> None:
    assert check_launch(expert_parallel=None, num_experts=4, batch_size=3, env={}) == 1
    assert check_launch(expert_parallel=2, num_experts=8, batch_size=8, env=TORCHRUN) == 4
    assert check_launch(expert_parallel=None, num_experts=None, batch_size=4, env=TORCHRUN) == 4


def test_expert_parallel_without_torchrun_on_the_command_line(tmp_path, capsys, monkeypatch) -> None:
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "1", "--corpus", str(FIXTURE),
                 "--expert-parallel", "2"]) == 2
    assert "--expert-parallel 2 needs 2 or a multiple of 2 processes" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, env", [
    pytest.param(["--expert-parallel", "2"], {}, id="flag"),
    pytest.param([], {"WORLD_SIZE": "2", "RANK": "0"}, id="torchrun"),
])
def test_vision_task_refuses_expert_parallelism(tmp_path, capsys, monkeypatch, flags, env) -> None:
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    out = tmp_path / "run"
    assert main(["train", "--task", "vision", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert "--task vision runs in one process" in err and f"WORLD_SIZE={env.get('WORLD_SIZE', '1')}" in err
    assert not out.exists()
