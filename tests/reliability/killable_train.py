"""Run `moekit train ARGS` in this process and SIGKILL it (a real kill, no clean-up) at a chosen point.

Used by the kill tests as `python killable_train.py ARGS`. `MOEKIT_TEST_KILL` names the point:
  `step:N`       when optimizer step N+1 starts (the trainer's step counter is N),
  `metrics:N`    halfway through appending step N's metrics line (a torn last line),
  `ckpt:N:I`     halfway through the I-th file (0-based) of step N's checkpoint.
With `MOEKIT_TEST_PAUSE=PATH` the process writes PATH and sleeps at that point instead, so the test
can act while it holds the run folder (and then kill it there). The hooks wrap moekit's own
functions from outside; moekit itself has no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from moekit.cli import main
from moekit.train import checkpoint as ckpt
from moekit.train import trainer as trainer_module
from moekit.train.metrics import MetricsLog

POINT = os.environ.get("MOEKIT_TEST_KILL", "")
PAUSE = os.environ.get("MOEKIT_TEST_PAUSE")


def die() -> None:
    if PAUSE:
        Path(PAUSE).write_text(f"{os.getpid()}\n")
        while True:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    kind, _, rest = POINT.partition(":")
    if kind == "step":
        real_step = trainer_module.Trainer.train_step

        def train_step(self):
            if self.step == int(rest):
                die()
            return real_step(self)

        trainer_module.Trainer.train_step = train_step
    elif kind == "metrics":
        real_write = MetricsLog.write

        def write(self, record):
            if record["step"] == int(rest):
                import json

                line = json.dumps(record) + "\n"
                with open(self.path, "a") as f:
                    f.write(line[: len(line) // 2])
                die()
            real_write(self, record)

        MetricsLog.write = write
    elif kind == "ckpt":
        step, index = (int(x) for x in rest.split(":"))
        real_file = ckpt._write_file
        seen: list[str] = []

        def write_file(path, data):
            if path.parent.name.startswith(f".tmp-{ckpt.checkpoint_name(step)}-"):
                seen.append(path.name)
                if len(seen) == index + 1:
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                    die()
            real_file(path, data)

        ckpt._write_file = write_file
    elif kind:
        raise SystemExit(f"unknown MOEKIT_TEST_KILL point {POINT!r}")


if __name__ == "__main__":
    install()
    raise SystemExit(main(["train", *sys.argv[1:]]))
