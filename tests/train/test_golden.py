"""A short deterministic training run reproduces its recorded losses (same torch, same threads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .helpers import golden_run

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"


def test_losses_match_the_golden_file(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if golden["torch"] != torch.__version__ or golden["threads"] != torch.get_num_threads():
        pytest.skip(f"golden losses were recorded with torch {golden['torch']} on {golden['threads']} "
                    f"threads; this is torch {torch.__version__} on {torch.get_num_threads()} threads. "
                    f"Regenerate with scripts/make_golden_train.py if the change is intended")
    got = golden_run(tmp_path)
    for key in ("losses", "val_losses", "grad_norms"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(golden[key]), rtol=1e-6, atol=1e-6,
                                   msg=lambda m, key=key: f"{key} differ from {GOLDEN.name}: {m}")
