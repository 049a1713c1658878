"""`moekit analyze` on a tiny trained run: JSON, PNGs and a self-contained HTML report; and on a trace."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main

from ..train.helpers import FIXTURE

PNG = b"\x89PNG\r\n\x1a\n"


def test_analyze_a_trained_run_writes_json_pngs_and_html(tiny_run, tmp_path):
    out = tmp_path / "out"
    trace = tmp_path / "trace.safetensors"
    argv = ["analyze", str(tiny_run), "--corpus", str(FIXTURE), "--out", str(out), "--sequences-per-domain", "6",
            "--knockout", "2", "--knockout-sequences", "8", "--min-count", "2", "--trace", str(trace),
            "--sample", "sonnets"]
    assert main(argv) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["info"]["label_names"] == sorted(p.stem.removesuffix("_gut") for p in FIXTURE.iterdir())
    assert len(data["layers"]) == 2 and all("domain" in x for x in data["layers"])
    assert [len(rows) for rows in data["knockout"]["experts"]] == [2, 2]
    assert data["saturation"]["steps"] == [2, 4]
    assert data["saturation"]["overlap"][-1] == [1.0, 1.0]    # the last checkpoint is the final model
    pngs = {"domain_expert.png", "coactivation.png", "baselines.png", "saturation.png", "knockout.png",
            "tokens_layer0.png", "tokens_layer1.png"}
    assert pngs <= {p.name for p in out.iterdir()}
    assert all((out / name).read_bytes().startswith(PNG) for name in pngs)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)  # every picture embedded, nothing linked
    assert "Metrics beside their null baselines" in html and "<table>" in html
    # the recorded trace analyzes alone, without model or corpus, to the same routing numbers
    out2 = tmp_path / "from_trace"
    assert main(["analyze", str(trace), "--out", str(out2), "--min-count", "2",
                 "--tokenizer", str(tiny_run / "tokenizer.json")]) == 0
    again = json.loads((out2 / "analysis.json").read_text())
    assert [x["load"] for x in again["layers"]] == [x["load"] for x in data["layers"]]
    assert [x["domain"] for x in again["layers"]] == [x["domain"] for x in data["layers"]]


@pytest.mark.parametrize("argv, message", [
    pytest.param(["/nonexistent/run", "--corpus", str(FIXTURE)], "does not exist", id="missing-path"),
    pytest.param(["RUN"], "--corpus is required", id="no-corpus"),
    pytest.param(["RUN", "--corpus", str(FIXTURE), "--knockout", "x"], "--knockout 'x' is invalid", id="knockout"),
    pytest.param(["RUN", "--corpus", str(FIXTURE), "--labels", "nope"], "neither one of", id="labels"),
])
def test_bad_analyze_input_is_a_clear_error(tiny_run, tmp_path, capsys, argv, message):
    argv = [str(tiny_run) if a == "RUN" else a for a in argv]
    assert main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_sample_must_name_a_domain(tiny_run, tmp_path, capsys):
    argv = ["analyze", str(tiny_run), "--corpus", str(FIXTURE), "--out", str(tmp_path / "o"), "--knockout",
            "none", "--no-saturation", "--sequences-per-domain", "2", "--sample", "othello"]
    assert main(argv) == 2
    assert "--sample 'othello' is not a domain" in capsys.readouterr().err
