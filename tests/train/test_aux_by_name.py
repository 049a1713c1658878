"""The trainer logs the aux losses the forward computed (once, by name), not a recomputation."""

from __future__ import annotations

import torch

from moekit.layer import RoutedLayer

from .helpers import make_trainer


def test_train_step_logs_the_forwards_named_losses_computed_once(tmp_path, monkeypatch) -> None:
    calls = []
    original = RoutedLayer.aux_losses

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(RoutedLayer, "aux_losses", counting)
    trainer = make_trainer(tmp_path, grad_accum=2)
    record = trainer.train_step()
    layers = len(trainer.model.moe_layers())
    assert len(calls) == layers * 2  # one per MoE layer and micro-step: the forward's own
    for name in ("load_balance", "z"):
        want = sum(float(c[name]) for c in calls) / 2
        assert abs(record[f"aux/{name}"] - want) < 1e-6
    assert torch.isfinite(torch.tensor(record["aux_loss"]))
