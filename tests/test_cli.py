"""The CLI entry point: help, demo, and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moekit.cli import COMMANDS, build_parser, main


def test_every_command_has_help() -> None:
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


def test_demo_runs_and_prints_table(capsys) -> None:
    assert main(["demo", "--tokens", "64", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    assert "expert_choice" in out and "MaxVio" in out


def test_console_script_entry() -> None:
    proc = subprocess.run([sys.executable, "-m", "moekit.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_unknown_command_fails() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
