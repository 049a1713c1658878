"""Labelled corpora: label modes, the `label<TAB>text` line format, and batches with padding."""

from __future__ import annotations

import json

import pytest

from moekit.analysis.corpora import (
    SHAKESPEARE_GENRES,
    domain_batches,
    dominant_script,
    labelled_documents,
    read_labelled_lines,
)
from moekit.train.data import SHAKESPEARE_NUM_WORKS

from ..train.helpers import FIXTURE


def test_genre_table_covers_the_42_works_in_four_genres():
    assert len(SHAKESPEARE_GENRES) == SHAKESPEARE_NUM_WORKS
    assert sorted(set(SHAKESPEARE_GENRES.values())) == ["comedy", "history", "poetry", "tragedy"]


def test_label_modes(tmp_path):
    genre = {d.name: d.label for d in labelled_documents(FIXTURE, "genre")}
    assert genre == {"hamlet": "tragedy", "macbeth": "tragedy", "romeo_and_juliet": "tragedy",
                     "sonnets": "poetry", "tempest": "comedy"}
    assert {d.label for d in labelled_documents(FIXTURE, "file")} == set(genre)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("x = 1\n")
    (tmp_path / "code" / "b.py").write_text("y = 2\n")
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "a.txt").write_text("Some words.\n")  # same stem as code/a.py
    docs = labelled_documents(tmp_path, "folder")
    assert sorted((d.label, d.text) for d in docs) == [("code", "x = 1\n"), ("code", "y = 2\n"),
                                                       ("prose", "Some words.\n")]
    table = tmp_path / "labels.json"
    table.write_text(json.dumps({"hamlet": "dane", "sonnets": "verse"}))
    assert sorted((d.name, d.label) for d in labelled_documents(FIXTURE, str(table))) == [
        ("hamlet", "dane"), ("sonnets", "verse")]


def test_labelled_lines_split_on_newline_only(tmp_path):
    f = tmp_path / "c.tsv"
    f.write_text("en\tone\u0085two\nru\tпривет мир\n\nen\tthree\n", encoding="utf-8")
    assert read_labelled_lines(f) == [("en", "one\u0085two"), ("ru", "привет мир"), ("en", "three")]
    docs = labelled_documents(f, "column")
    assert [(d.label, d.text) for d in docs] == [("en", "one\u0085two\nthree"), ("ru", "привет мир")]
    assert [d.label for d in labelled_documents(f, "script")] == ["latin", "cyrillic"]
    f.write_text("en\tfine\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.tsv:2: expected `label<TAB>text`"):
        read_labelled_lines(f)


def test_dominant_script():
    assert dominant_script("Hello, мир world") == "latin"
    assert dominant_script("ダルビッシュ「やりたいことできた」") == "japanese"
    assert dominant_script("123 !") == "none"


def test_domain_batches_pad_the_last_window_and_cap_each_domain():
    from moekit.analysis.corpora import LabelledDocument

    docs = [LabelledDocument("a", "x", "a" * 10), LabelledDocument("b", "y", "b" * 3),
            LabelledDocument("c", "y", "c" * 1)]
    encode = lambda text: [ord(ch) for ch in text]  # noqa: E731
    data = domain_batches(docs, encode, seq_len=4, max_sequences_per_domain=2, batch_size=8)
    assert data.label_names == ("x", "y")
    tokens, mask = data.batches[0]
    # domain x has windows aaaa aaaa aa: two evenly spaced picks are the first and the last
    assert tokens.tolist()[:2] == [[97] * 4, [97, 97, 0, 0]]
    assert mask.tolist()[:2] == [[True] * 4, [True, True, False, False]]
    assert tokens.tolist()[2] == [98, 98, 98, 0]                 # the 1-token document gives no window
    assert data.labels[0].tolist() == [0, 0, 1]
    assert data.documents == ("a", "a", "b")
