"""Pruning: keeping every expert is the identical model; pruning equals router knock-out of the
dropped experts; merging is the token-weighted average; `moekit prune` writes a checkpoint that reloads."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.analysis import analyze
from moekit.analysis.knockout import eval_loss, experts_disabled
from moekit.analysis.prune import plan_keep, prune_model
from moekit.analysis.sources import load_model_dir
from moekit.cli import main

from ..train.helpers import FIXTURE
from .test_analyze import batches_and_labels, tiny_model


def test_plan_keep():
    counts = [torch.tensor([5, 0, 3, 2]), torch.tensor([1, 2, 8, 0])]
    assert plan_keep(counts, keep=2) == [[0, 2], [1, 2]]
    assert plan_keep(counts, drop_below=0.25) == [[0, 2], [1, 2]]  # 2 survivors in layer 0, 1 in layer 1
    assert plan_keep(counts, drop_below=0.15) == [[0, 2, 3], [0, 1, 2]]
    assert plan_keep([torch.tensor([1, 1, 0])], keep=1) == [[0]]    # ties go to the lower id
    with pytest.raises(ValueError, match="keep=5 is invalid"):
        plan_keep(counts, keep=5)
    with pytest.raises(ValueError, match="exactly one"):
        plan_keep(counts)


def test_keeping_every_expert_gives_the_identical_model():
    model = tiny_model()
    pruned = prune_model(model, [[0, 1, 2, 3]] * 2)
    tokens = batches_and_labels()[0][0]
    with torch.no_grad():
        assert torch.equal(pruned(tokens).logits, model(tokens).logits)


def test_pruning_equals_router_knockout_of_the_dropped_experts():
    model = tiny_model()
    tokens = batches_and_labels()[0][0]
    pruned = prune_model(model, [[0, 2, 3], [0, 1, 3]])
    layers = model.moe_layers()
    with experts_disabled(layers[0], [1], method="router"), experts_disabled(layers[1], [2], method="router"):
        with torch.no_grad():
            expected = model(tokens).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    assert pruned.config.moe.num_experts == 3


def test_merge_is_the_token_weighted_average_into_the_most_coactivated_survivor():
    model = tiny_model()
    batches, labels = batches_and_labels()
    result = analyze(model, batches, labels, label_names=("a", "b"))
    counts = [torch.tensor(x["load"]["tokens_per_expert"]) for x in result.layers]
    coact = [torch.tensor(x["coactivation"]["p_b_given_a"]) for x in result.layers]
    keep = [[0, 1, 2], [0, 1, 2]]
    merged = prune_model(model, keep, merge=True, counts=counts, coactivation=coact)
    for pos, (old, new) in enumerate(zip(model.moe_layers(), merged.moe_layers())):
        target = int(torch.argmax(coact[pos][3, :3]))          # expert 3 goes to its most co-activated survivor
        n_t, n_d = float(counts[pos][target]), float(counts[pos][3])
        w = old.experts.w_up_EDF
        expected = (n_t * w[target] + n_d * w[3]) / (n_t + n_d)
        torch.testing.assert_close(new.experts.w_up_EDF[target], expected)
        others = [e for e in range(3) if e != target]
        assert torch.equal(new.experts.w_up_EDF[others], w[others])
        assert torch.equal(new.router.gate.weight, old.router.gate.weight[:3])


def test_bad_prune_input_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="same number of experts"):
        prune_model(model, [[0, 1], [0, 1, 2]])
    with pytest.raises(ValueError, match="merge needs counts"):
        prune_model(model, [[0, 1]] * 2, merge=True)
    hashed = tiny_model(router="hash", hash_vocab_size=50, load_balance_coef=0.0)
    with pytest.raises(ValueError, match="cannot be pruned"):
        prune_model(hashed, [[0, 1]] * 2)


def test_prune_cli_writes_a_checkpoint_that_reloads_with_the_reported_loss(tiny_run, tmp_path):
    out = tmp_path / "pruned"
    argv = ["prune", str(tiny_run), "--corpus", str(FIXTURE), "--keep", "2", "--out", str(out),
            "--sequences-per-domain", "6", "--merge"]
    assert main(argv) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["num_experts_before"] == 4 and report["num_experts_after"] == 2
    assert report["loss_reloaded"] == pytest.approx(report["loss_after"], abs=1e-6)
    assert report["loss_delta"] == pytest.approx(report["loss_after"] - report["loss_before"])
    reloaded = load_model_dir(out)
    assert reloaded.config.moe.num_experts == 2
    # the tiny preset is a Mixtral: the pruned checkpoint loads in transformers with the same logits
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.arange(12)[None] % reloaded.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, reloaded(tokens).logits, rtol=1e-4, atol=1e-4)
    assert main(argv) == 2                                      # refuses a non-empty --out
    with pytest.raises(ValueError):
        eval_loss(reloaded, [torch.zeros(1, 1, dtype=torch.long)])  # no target: a clear error
