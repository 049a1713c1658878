"""Regenerate tests/train/golden/tiny_losses.json: the per-step losses of a short deterministic run.

    .venv/bin/python scripts/make_golden_train.py

Run it only when a change is meant to alter training numerics, and say so in the commit. The file
records the torch version and thread count; the test skips on any other (reductions differ).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.train.helpers import golden_run  # noqa: E402

GOLDEN = ROOT / "tests" / "train" / "golden" / "tiny_losses.json"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record = golden_run(Path(tmp))
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(record['losses'])} steps, torch {record['torch']}, "
          f"{record['threads']} threads")


if __name__ == "__main__":
    main()
