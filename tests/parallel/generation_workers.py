"""Code the spawned gloo ranks of the sharded-generation test run (importable, so spawn finds it).

Every rank loads the same tiny model directory and keeps its experts; rank 0 also loads an
unsharded copy, the one-process reference, and compares: a full forward's logits, and the engine's
greedy tokens for requests that share decode steps and join mid-flight. The followers count the
forwards they took part in; rank 0 checks the count against its own.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit.inference import Engine, Request, SamplingParams, load
from moekit.parallel import build_mesh
from moekit.parallel.serving import Leader, follow, shard_for_inference

PROMPTS = ["a", "the quick brown fox", "hello there"]
NEW = [7, 5, 9]


def _engine_tokens(loaded) -> list[list[int]]:
    """Greedy tokens of PROMPTS through one engine with 2 slots (request 2 joins after 3 steps)."""
    engine = Engine(loaded, max_batch_size=2, prefill_chunk=4)
    requests = [Request(prompt_ids=loaded.tokenizer.encode(p), params=SamplingParams(max_new_tokens=n, temperature=0))
                for p, n in zip(PROMPTS, NEW)]
    for r in requests[:2]:
        engine.submit(r)
    steps = 0
    while not all(r.done for r in requests):
        if steps == 3:
            engine.submit(requests[2])
        engine.step()
        steps += 1
    assert all(r.finish_reason == "length" for r in requests), [r.error for r in requests]
    return [r.output_ids for r in requests]


def _counts(world: int) -> list[torch.Tensor]:
    return [torch.zeros(1, dtype=torch.long) for _ in range(world)]


def run(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loaded = load(path)
        model = shard_for_inference(loaded.model, build_mesh(expert_parallel=world))
        experts = model.moe_layers()[0].experts
        assert experts.num_experts == experts.num_global // world, "the experts were not split"
        if rank != 0:
            dist.all_gather(_counts(world), torch.tensor([follow(model)]))
            return
        forwards = [0]
        model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        leader = Leader(model, heartbeat_s=0.05)  # heartbeats between the forwards below too
        try:
            reference = load(path)
            tokens_BS = torch.tensor([loaded.tokenizer.encode("jumps over the lazy dog")] * 2)
            tokens_BS[1, 3:] = tokens_BS[1, 3:].flip(0)
            with torch.inference_mode():
                torch.testing.assert_close(model(tokens_BS).logits, reference.model(tokens_BS).logits,
                                           rtol=1e-5, atol=1e-5)
            ours, theirs = _engine_tokens(loaded), _engine_tokens(reference)
            assert ours == theirs, (ours, theirs)
            assert all(len(t) == n for t, n in zip(ours, NEW))
        finally:
            leader.close()
        counts = _counts(world)
        dist.all_gather(counts, torch.tensor([forwards[0]]))
        assert [int(c) for c in counts] == [forwards[0]] * world and forwards[0] > 10, counts
    finally:
        dist.destroy_process_group()


def run_failed_forward(rank: int, world: int, port: int, path: str) -> None:
    """Rank 0's forward raises after FORWARD went out: rank 0 refuses the next forward, and the
    follower, left inside a collective, ends with an error once rank 0's process has exited."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    loaded = load(path)
    model = shard_for_inference(loaded.model, build_mesh(expert_parallel=world))
    if rank != 0:
        start = time.monotonic()
        try:
            follow(model)
        except RuntimeError:  # the peer went away (not the 120 s collective timeout)
            assert time.monotonic() - start < 60, time.monotonic() - start
            # As on rank 0: a group whose peer is gone cannot be torn down, and letting the
            # interpreter destroy it can abort the process ("terminate called ..."), so exit here.
            os._exit(0)
        raise AssertionError("the follower returned as if rank 0 had sent STOP")
    leader = Leader(model)
    bad_BS = torch.full((1, 3), model.config.vocab_size)  # out of range: the forward raises
    with torch.inference_mode():
        for expected in ("vocab", "out of step"):
            try:
                model(bad_BS if expected == "vocab" else bad_BS.clamp(max=0))
            except (ValueError, RuntimeError, IndexError) as err:
                assert expected != "out of step" or "out of step" in str(err), err
            else:
                raise AssertionError("the forward did not raise")
    leader.close()  # sends nothing: the follower cannot take it
    os._exit(0)  # the process group cannot be torn down in step; the follower learns from the exit
