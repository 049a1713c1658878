"""A tiny trained run (4 steps on the committed fixture, checkpoints at steps 2 and 4), shared by
the analyze and prune CLI tests."""

from __future__ import annotations

import pytest

from moekit.cli import main

from ..train.helpers import FIXTURE

TRAIN = ["--preset", "tiny", "--steps", "4", "--corpus", str(FIXTURE), "--vocab-size", "300", "--batch-size",
         "4", "--seq-len", "16", "--eval-every", "2", "--eval-sequences", "4", "--checkpoint-every", "2",
         "--keep-last", "3", "--quiet"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("analyze") / "run"
    assert main(["train", "--out", str(run), *TRAIN]) == 0
    return run
