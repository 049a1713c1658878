"""Atomic checkpoints: round trip, keep-last-K, torn and corrupt folders, optimizer and model state."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from moekit.train import checkpoint as ckpt


def _save(root, step, value=1.0, **kw):
    return ckpt.save_checkpoint(root, step, tensors={"model": {"w": torch.full((2, 3), value)}},
                                state={"step": step}, **kw)


def test_round_trip_and_manifest(tmp_path):
    path = _save(tmp_path, 7, value=2.5)
    assert path.name == "step_00000007"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.json"}
    tensors, state = ckpt.read_checkpoint(path)
    assert torch.equal(tensors["model"]["w"], torch.full((2, 3), 2.5)) and state == {"step": 7}


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000003"]


def test_kill_while_writing_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    _save(tmp_path, 1, value=1.0)
    calls = []
    real_write = ckpt._write_file

    def dying_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:  # die after the first file of the new checkpoint
            raise KeyboardInterrupt("killed mid-write")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, value=2.0)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    path, skipped = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step_00000001" and skipped == []
    assert torch.equal(ckpt.read_checkpoint(path)[0]["model"]["w"], torch.ones(2, 3))


def test_torn_folder_without_manifest_is_skipped(tmp_path):
    _save(tmp_path, 1)
    torn = _save(tmp_path, 2)
    (torn / "manifest.json").unlink()  # as if killed just before the manifest was written
    path, skipped = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step_00000001"
    assert len(skipped) == 1 and "no manifest" in skipped[0]


def test_corrupt_file_is_detected_and_skipped(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(raw))
    assert "sha256" in ckpt.verify_checkpoint(bad)
    with pytest.raises(ValueError, match="not usable.*model.safetensors"):
        ckpt.read_checkpoint(bad)
    path, skipped = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step_00000001" and "corrupt" in skipped[0]


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_tensors(opt)
    path = ckpt.save_checkpoint(tmp_path, 1, tensors={"optimizer": tensors}, state=meta)
    loaded, meta2 = ckpt.read_checkpoint(path)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    ckpt.load_optimizer_tensors(opt2, loaded["optimizer"], meta2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert b["param_groups"][0]["lr"] == 0.1
    for index, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


def test_model_tensors_include_non_persistent_buffers_and_mismatch_is_named():
    model = nn.Linear(2, 3)
    model.register_buffer("counts", torch.arange(3.0), persistent=False)
    assert set(ckpt.model_tensors(model)) == {"weight", "bias", "counts"}
    other = nn.Linear(2, 4)
    other.register_buffer("counts", torch.zeros(3), persistent=False)
    before = other.weight.detach().clone()
    with pytest.raises(ValueError, match=r"another|does not fit.*weight: saved \(3, 2\), model \(4, 2\)"):
        ckpt.load_model_tensors(other, ckpt.model_tensors(model))
    assert torch.equal(other.weight, before)  # nothing copied


def test_incomplete_rank_shards_are_refused_before_the_commit(tmp_path):
    """A checkpoint's sharded/ folder must hold every key whole: a rank whose file is not there
    (ranks on machines without a shared folder) is a ValueError naming the key, never a commit."""
    from safetensors.torch import save_file

    (tmp_path / ckpt.SHARDED).mkdir()
    info = {"model/w": {"saved_offsets": [2, 0]}}  # rank 1's half of a (4, 2) tensor; rank 0's is missing
    def write(rank: int, value: float) -> None:
        save_file({"model/w": torch.full((2, 2), value)},
                  str(tmp_path / ckpt.SHARDED / f"shard-0000{rank + 1}-model-00001-of-00001.safetensors"),
                  metadata={"DCP_SHARDING_INFO": json.dumps(info), "DCP_VERSION": "1.0", "format": "pt"})

    write(1, 1.0)
    assert ckpt.shard_layout(tmp_path) == {"model/w": (torch.Size([4, 2]), torch.float32)}
    with pytest.raises(ValueError, match=r"partly written \['model/w'\].*filesystem all machines share"):
        ckpt.check_shards(tmp_path, {"model/w"})
    with pytest.raises(ValueError, match=r"missing \['model/b'\]"):
        ckpt.check_shards(tmp_path, {"model/w", "model/b"})
    info["model/w"]["saved_offsets"] = [0, 0]
    write(0, 0.0)
    ckpt.check_shards(tmp_path, {"model/w"})  # both halves: complete
    target = {"model/w": torch.empty(4, 2)}
    ckpt.read_shards(tmp_path, target, distributed=False)
    assert target["model/w"].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
