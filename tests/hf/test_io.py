"""Sharded safetensors IO: round trips, shard sizes, and the error for each kind of broken checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.hf.io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    parse_size,
    plan_shards,
    prepare_destination,
    write_checkpoint,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 16, generator=g),  # 512 bytes
        "b.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),  # 256 bytes
        "c.bias": torch.arange(5, dtype=torch.int64),  # 40 bytes
        "d.weight": torch.randn(4, 4, 4, generator=g),  # 256 bytes; at 600 per shard: [a], [b c d]
    }


@pytest.mark.parametrize(
    "size, expected",
    [
        pytest.param(1000, 1000, id="int"),
        pytest.param("5GB", 5 * 10**9, id="GB"),
        pytest.param("2GiB", 2 * 2**30, id="GiB"),
        pytest.param("1.5MB", 1_500_000, id="fractional"),
        pytest.param("300kb", 300_000, id="lowercase"),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("bad", [pytest.param(0, id="zero"), pytest.param("lots", id="word"),
                                 pytest.param("-5MB", id="negative")])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(bad)


def test_plan_shards_respects_limit_and_order():
    shards = plan_shards([("a", 6), ("b", 5), ("c", 4), ("d", 20), ("e", 1)], 10)
    # a alone (a+b = 11 > 10), b+c = 9, d alone though larger than the limit, e.
    assert shards == [["a"], ["b", "c"], ["d"], ["e"]]


@pytest.mark.parametrize("max_size, n_files", [pytest.param("1GB", 1, id="single"),
                                               pytest.param(600, 2, id="sharded")])
def test_round_trip_bit_exact(tmp_path, max_size, n_files):
    tensors = _tensors()
    written = write_checkpoint(tmp_path, tensors, max_shard_size=max_size)
    shards = [f for f in written if f.endswith(".safetensors")]
    assert len(shards) == n_files
    assert (INDEX_FILE in written) == (n_files > 1)
    with CheckpointReader(tmp_path) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert reader.shape(name) == tuple(t.shape)
            assert reader.dtype(name) == t.dtype
            got = reader.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t)
    if n_files > 1:
        index = json.loads((tmp_path / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for shard in shards:
            assert (tmp_path / shard).stat().st_size < 600 + 1024  # data + a small header


def test_rewrite_refuses_existing_weights_and_overwrite_removes_stale_shards(tmp_path):
    write_checkpoint(tmp_path, _tensors(), max_shard_size=600)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="already holds checkpoint weights"):
        write_checkpoint(tmp_path, _tensors(), max_shard_size="1GB")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "notes.txt").write_text("kept")
    prepare_destination(tmp_path, overwrite=True)  # the stale shards and index go, the notes stay
    write_checkpoint(tmp_path, _tensors(), max_shard_size="1GB")
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE, "notes.txt"]


def test_missing_shard_names_file_and_key(tmp_path):
    written = write_checkpoint(tmp_path, _tensors(), max_shard_size=600)
    (tmp_path / written[1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{written[1]}.*shard missing.*tensor '"):
        CheckpointReader(tmp_path)


def test_index_naming_a_tensor_absent_from_its_shard(tmp_path):
    write_checkpoint(tmp_path, _tensors(), max_shard_size=600)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = index["weight_map"]["a.weight"]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no tensor 'ghost.weight'"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("keep", [pytest.param(0.5, id="half"), pytest.param(0.001, id="header-cut")])
def test_truncated_file(tmp_path, keep):
    write_checkpoint(tmp_path, _tensors())
    path = tmp_path / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError, match=rf"{SINGLE_FILE}.*truncated or corrupted"):
        CheckpointReader(tmp_path)


def test_garbage_file(tmp_path):
    (tmp_path / SINGLE_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        CheckpointReader(tmp_path)


def test_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CheckpointReader(tmp_path)


def test_pickle_files_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors only"):
        CheckpointReader(tmp_path)


def test_bad_index(tmp_path):
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        CheckpointReader(tmp_path)
