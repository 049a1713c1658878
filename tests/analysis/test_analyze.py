"""analyze() on a tiny model: its load counts equal a recount from ModelOutput.routing; traces
round-trip through their file; knock-out of an unused expert changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.analysis import analyze
from moekit.analysis.knockout import eval_loss, experts_disabled, knockout_losses, shared_disabled
from moekit.analysis.trace import RoutingTrace

V = 50


def tiny_model(**moe_changes) -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, **moe_changes)
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=16,
                      moe=moe, moe_layers="from:1")
    return MoETransformer(cfg).eval()


def batches_and_labels():
    gen = torch.Generator().manual_seed(1)
    b1 = torch.randint(0, V, (3, 12), generator=gen)
    b2 = torch.randint(0, V, (2, 12), generator=gen)
    mask2 = torch.ones(2, 12, dtype=torch.bool)
    mask2[1, 7:] = False                                      # a padded sequence
    return [b1, (b2, mask2)], [torch.tensor([0, 1, 0]), torch.tensor([1, 1])]


def test_load_counts_equal_a_recount_from_model_routing(tmp_path):
    model = tiny_model()
    batches, labels = batches_and_labels()
    result = analyze(model, batches, labels, label_names=("a", "b"))
    # independent recount: counts_E of every MoE layer's decision, summed over the batches
    recount = None
    with torch.no_grad():
        for batch in batches:
            tokens, mask = (batch, None) if isinstance(batch, torch.Tensor) else batch
            per_layer = [d.counts_E for d in model(tokens, mask_BS=mask).routing if d is not None]
            recount = per_layer if recount is None else [a + b for a, b in zip(recount, per_layer)]
    path = result.save_json(tmp_path / "analysis.json")
    saved = json.loads(path.read_text())
    assert [layer["load"]["tokens_per_expert"] for layer in saved["layers"]] == [c.tolist() for c in recount]
    assert [layer["layer"] for layer in saved["layers"]] == [1, 2]
    assert saved["info"]["tokens"] == 3 * 12 + 12 + 7          # padding left out
    assert saved["info"]["sequences"] == 5
    domain = saved["layers"][0]["domain"]
    assert domain["tokens_per_domain"] == [24, 12 + 12 + 7]
    assert all(sum(row) == pytest.approx(2.0) for row in domain["share"])  # k = 2 slots per token


def test_trace_round_trips_and_bad_files_are_refused(tmp_path):
    model = tiny_model(capacity_factor=0.5)                    # drops: selected_NK is kept
    batches, labels = batches_and_labels()
    trace = analyze(model, batches, labels, label_names=("a", "b")).trace
    assert trace.layers[0].selected_NK is not None and trace.layers[0].dropped_NK.any()
    path = trace.save(tmp_path / "trace.safetensors")
    back = RoutingTrace.load(path)
    assert back.label_names == ("a", "b")
    for name in ("token_ids_N", "sequence_N", "position_N", "labels_N"):
        assert torch.equal(getattr(back, name), getattr(trace, name))
    for a, b in zip(back.layers, trace.layers):
        assert (a.layer, a.num_experts) == (b.layer, b.num_experts)
        for name in ("expert_ids_NK", "weights_NK", "selected_NK", "entropy_N"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    # slot 0 is the highest-weight expert
    w = trace.layers[0].weights_NK
    assert (w[:, 0] >= w[:, 1]).all()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        RoutingTrace.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        RoutingTrace.load(tmp_path / "missing.safetensors")


def test_bad_analyze_input_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="one .* tensor of domain indices per batch"):
        analyze(model, [torch.zeros(2, 4, dtype=torch.long)], [])
    with pytest.raises(ValueError, match=r"labels\[0\] has shape"):
        analyze(model, [torch.zeros(2, 4, dtype=torch.long)], [torch.tensor([0])], label_names=("a",))
    with pytest.raises(TypeError, match="2-D integer tensor"):
        analyze(model, [torch.zeros(4, dtype=torch.long)])


def _model_with_dead_expert(dead: int, **moe_changes) -> MoETransformer:
    model = tiny_model(router_bias=True, **moe_changes)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.gate.bias[dead] = -1e4               # never among any token's top-2
            for p in layer.experts.parameters():              # experts large enough to matter to the
                p.normal_(std=0.2)                            # loss (the 0.02 init barely does)
    return model


@pytest.mark.parametrize("method", ["router", "zero"])
def test_knocking_out_an_expert_without_tokens_changes_nothing(method):
    model = _model_with_dead_expert(3)
    batches, _ = batches_and_labels()
    result = analyze(model, batches)
    assert all(layer["load"]["tokens_per_expert"][3] == 0 for layer in result.layers)
    base = eval_loss(model, batches)
    layer = model.moe_layers()[0]
    with experts_disabled(layer, [3], method=method):
        same = eval_loss(model, batches)
    assert same == pytest.approx(base, rel=1e-6, abs=1e-6)
    with experts_disabled(layer, [0], method=method):         # a used expert does change the loss
        changed = eval_loss(model, batches)
    assert abs(changed - base) > 1e-4
    assert eval_loss(model, batches) == base                   # restored exactly afterwards


def test_router_knockout_equals_routing_among_the_survivors():
    model = tiny_model()
    batches, _ = batches_and_labels()
    layer = model.moe_layers()[0]
    with experts_disabled(layer, [1], method="router"):
        with torch.no_grad():
            d = model(batches[0]).routing[1]
    assert not (d.expert_ids_TK == 1).any()
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(d.weights_TK.shape[0]))
    assert layer.router.gate.bias is None                      # the temporary bias is gone again


def test_knockout_losses_report_and_shared_expert():
    model = _model_with_dead_expert(2, num_shared_experts=1)
    batches, _ = batches_and_labels()
    counts = [torch.tensor(x["load"]["tokens_per_expert"]) for x in analyze(model, batches).layers]
    out = knockout_losses(model, batches, counts=counts, top_n=None)
    assert out["method"] == ["router", "router"]
    assert [[r["expert"] for r in rows] for rows in out["experts"]] == [[0, 1, 2, 3]] * 2
    dead = [r for rows in out["experts"] for r in rows if r["expert"] == 2]
    assert all(r["tokens"] == 0 and abs(r["delta"]) < 1e-5 for r in dead)
    assert all(s is not None and abs(s["delta"]) > 1e-7 for s in out["shared"])  # small init: small effect
    top = knockout_losses(model, batches, counts=counts, top_n=1)
    assert [len(rows) for rows in top["experts"]] == [1, 1]
    assert top["experts"][0][0]["expert"] == int(counts[0].argmax())
    with pytest.raises(ValueError, match="no shared expert"):
        with shared_disabled(tiny_model().moe_layers()[0]):
            pass


def test_cache_subset_takes_whole_sequences_evenly():
    from moekit.analysis.analyze import cache_subset

    seq = torch.arange(10).repeat_interleave(100)
    keep = cache_subset(seq, 300)
    assert sorted(set(seq[keep].tolist())) == [0, 4, 9]          # 3 of 10 sequences, spread out
    assert int(keep.sum()) == 300
    assert bool(cache_subset(seq, 5000).all())


def test_passage_pieces_put_a_split_character_on_the_token_that_completes_it():
    from moekit.analysis.report import passage_pieces

    model = tiny_model()
    tokens = torch.tensor([[1, 2, 3, 4]])
    result = analyze(model, [tokens])
    # ids 2 and 3 are the two halves of one character; id 1 is "a", id 4 is "b"
    text = {1: b"a", 2: b"\xc3", 3: b"\xa9", 4: b"b"}
    decode_ids = lambda ids: b"".join(text[i] for i in ids).decode("utf-8", "replace")  # noqa: E731
    pieces = passage_pieces(result, 0, 0, decode_ids)
    assert [p for p, _ in pieces] == ["a", "", "é", "b"]
    assert [e for _, e in pieces] == result.trace.layers[0].expert_ids_NK[:, 0].tolist()
