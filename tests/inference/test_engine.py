"""The continuous-batching engine: prompts of different lengths in one batch, and requests that
join mid-flight, get exactly the greedy tokens (fp32) they get alone, for every decoder family."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.inference import Engine, QueueFull, Request, SamplingParams, load
from tests.inference.tiny import DECODERS, save_tiny_with_tokenizer

PROMPTS = ["a", "the quick brown fox", "hello there", "jumps over the lazy dog again"]
NEW = [9, 6, 12, 7]


@pytest.fixture(scope="module")
def loaded_models(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(model_type: str):
        if model_type not in cache:
            path = tmp_path_factory.mktemp(model_type)
            save_tiny_with_tokenizer(model_type, path)
            cache[model_type] = load(path)
        return cache[model_type]

    return get


def _request(loaded, i: int, **kw) -> Request:
    return Request(prompt_ids=loaded.tokenizer.encode(PROMPTS[i]),
                   params=SamplingParams(max_new_tokens=NEW[i], temperature=0), **kw)


def _run(engine: Engine, requests: list[Request], join_after: dict[int, int] | None = None) -> None:
    """Submit requests (request i after `join_after[i]` steps) and step until all are done."""
    join_after = join_after or {}
    steps = 0
    while True:
        for i, r in enumerate(requests):
            if r.id < 0 and join_after.get(i, 0) <= steps:
                engine.submit(r)
        if all(r.done for r in requests):
            return
        engine.step()
        steps += 1
        assert steps < 500


@pytest.mark.parametrize("model_type", [pytest.param(t, id=t) for t in DECODERS])
def test_batched_and_joining_requests_equal_alone(loaded_models, model_type):
    loaded = loaded_models(model_type)
    alone = [moekit.generate(loaded, PROMPTS[i], max_new_tokens=NEW[i], temperature=0).token_ids
             for i in range(len(PROMPTS))]
    # all at once, in a batch of three slots (the fourth waits for a free one)
    together = [_request(loaded, i) for i in range(len(PROMPTS))]
    _run(Engine(loaded, max_batch_size=3, prefill_chunk=4), together)
    assert [r.output_ids for r in together] == alone
    # two start, two join while those decode (so slots free and refill out of order)
    joining = [_request(loaded, i) for i in range(len(PROMPTS))]
    _run(Engine(loaded, max_batch_size=4, prefill_chunk=5), joining, join_after={2: 4, 3: 9})
    assert [r.output_ids for r in joining] == alone


def test_routing_counts_per_request(loaded_models):
    loaded = loaded_models("qwen3_moe")
    top_k = loaded.model.config.moe.top_k
    requests = [_request(loaded, i, routing=True) for i in (0, 1)]
    _run(Engine(loaded, max_batch_size=2, prefill_chunk=3), requests)
    alone = _request(loaded, 1, routing=True)
    _run(Engine(loaded, max_batch_size=1), [alone])
    moe_layers = [i for i, layer in enumerate(loaded.model.model.layers) if layer.mlp in loaded.model.moe_layers()]
    for r in requests:
        assert sorted(r.routing_counts) == moe_layers
        fed = len(r.prompt_ids) + len(r.output_ids) - 1  # the last token is never fed back
        for counts_E in r.routing_counts.values():
            assert int(counts_E.sum()) == fed * top_k
    for layer in moe_layers:
        assert torch.equal(requests[1].routing_counts[layer], alone.routing_counts[layer])


def test_cancel_frees_the_slot_and_queue_limit(loaded_models):
    loaded = loaded_models("mixtral")
    engine = Engine(loaded, max_batch_size=1, max_queue=1)
    first, second = _request(loaded, 1), _request(loaded, 2)
    engine.submit(first)
    engine.submit(second)
    with pytest.raises(QueueFull):
        engine.submit(_request(loaded, 0))
    engine.step()
    engine.cancel(first)
    _run(engine, [second])
    assert first.finish_reason == "cancelled" and engine.free == [0] and not engine.running
    want = moekit.generate(loaded, PROMPTS[2], max_new_tokens=NEW[2], temperature=0).token_ids
    assert second.output_ids == want


def test_bad_requests_are_value_errors(loaded_models):
    loaded = loaded_models("mixtral")
    engine = Engine(loaded, max_batch_size=1)
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request(prompt_ids=[], params=SamplingParams()))
    with pytest.raises(ValueError, match="context window"):
        engine.submit(Request(prompt_ids=[3] * 10, params=SamplingParams(max_new_tokens=engine.max_len)))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(Request(prompt_ids=[10_000], params=SamplingParams()))
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(loaded, max_batch_size=0)


def test_requests_arriving_together_share_prefill_forwards(loaded_models):
    """Three prompts (3, 5 and 8 tokens) submitted at once are prefilled together, each forward cut
    at the shortest remainder (3, then 2, then 3 tokens), and still get what they get alone."""
    loaded = loaded_models("qwen3_moe")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]]
    alone = [moekit.generate(loaded, p, max_new_tokens=4, temperature=0).token_ids for p in prompts]
    shapes: list[tuple[int, int]] = []
    hook = loaded.model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        requests = [Request(prompt_ids=p, params=SamplingParams(max_new_tokens=4, temperature=0))
                    for p in prompts]
        _run(Engine(loaded, max_batch_size=3, prefill_chunk=64), requests)
    finally:
        hook.remove()
    assert [r.output_ids for r in requests] == alone
    # the prefill forwards (decode forwards have one token per row): 3 x 3, then 2 x 2, then 1 x 3
    assert [s for s in shapes if s[1] > 1] == [(3, 3), (2, 2), (1, 3)]
