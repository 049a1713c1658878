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
    assert "MaxVio" in out
    from moekit.traits import ROUTER_TRAITS
    for router in ROUTER_TRAITS:  # every router of the table has a row
        assert f"│ {router} " in out, router


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--tokens", "0"], "--tokens: 0 is invalid: must be >= 1", id="zero-tokens"),
    pytest.param(["--experts", "-2"], "--experts: -2 is invalid", id="negative-experts"),
    pytest.param(["--d-model", "x"], "'x' is not an integer", id="not-an-integer"),
])
def test_demo_refuses_bad_flags(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_demo_refuses_top_k_above_experts(capsys) -> None:
    assert main(["demo", "--experts", "2", "--top-k", "3"]) == 2
    assert "--top-k 3 is invalid: must be <= --experts (2)" in capsys.readouterr().err


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


def test_threads_sets_torch_threads_and_refuses_zero() -> None:
    import torch

    from moekit.tasks import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(None)
        assert torch.get_num_threads() == before  # not given: torch's default stays
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads 0: must be >= 1"):
        set_threads(0)


@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
def test_language_model_commands_refuse_bad_threads(command, tmp_path, capsys) -> None:
    # The language-model path takes --threads too (it used to ignore it); checked before any work.
    assert main([command, "--threads", "0", "--out", str(tmp_path / "run")]) != 0
    assert "--threads 0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
