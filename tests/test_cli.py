"""The CLI entry point: help, demo, and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom moekit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("False")


def test_only_the_chosen_command_builds_its_arguments() -> None:
    parser = build_parser(only="convert")
    assert parser.parse_args(["convert", "a", "b", "--overwrite"]).overwrite
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--tokens", "5"])  # demo's arguments were not built


def test_the_package_has_no_import_cycle() -> None:
    # function-level imports count too: a lazy import that closes a circle is still a circle
    script = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
    proc = subprocess.run([sys.executable, str(script), "--lazy", "--cycles-only"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0 import cycle(s)"), proc.stdout
