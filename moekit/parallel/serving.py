"""Generation with the experts split over ranks: rank 0 runs the engine, the other ranks follow.

Every rank loads the model and keeps only its `E / ep` experts (`shard_for_inference`). Rank 0
generates or serves exactly as one process does; a `Leader` hooked on its model broadcasts FORWARD
before each model forward, and each follower (`follow`) then runs, layer by layer, the MoE
layers' all-to-all with no tokens of its own: it computes its experts on the rows rank 0 sends
and returns them. The followers hold no cache and run no attention. While rank 0 is idle the
leader broadcasts HEARTBEAT every `heartbeat_s` seconds, so the followers' wait stays inside the
process group's timeout; STOP (from `Leader.close`) ends them. A forward that fails on rank 0
after FORWARD was sent leaves the followers inside a collective that cannot complete: the leader
then refuses further forwards, and the followers end when rank 0's process exits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moekit.layer import MoELayer, moe_layers
from moekit.parallel.shard import parallelize
from moekit.types import RoutingDecision

if TYPE_CHECKING:
    from moekit.inference.load import LoadedModel

STOP, FORWARD, HEARTBEAT = 0, 1, 2


def shard_for_inference(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """`parallelize` for generation: rank 0 holds every token, so no loss counts over ranks."""
    if mesh["dp"].size() != 1:
        raise ValueError(f"generation runs one expert-parallel group; the mesh has {mesh['dp'].size()} "
                         f"data-parallel groups (launch exactly --expert-parallel processes)")
    parallelize(model, mesh)
    for layer in moe_layers(model):
        layer.batch_group = None
    return model


def _send(command: int) -> None:
    dist.broadcast(torch.tensor([command], dtype=torch.long), src=0)


class Leader:
    """Rank 0's side: a FORWARD broadcast before every forward of `model` (forward hooks, so the
    engine calling the model is unchanged), heartbeats while idle, STOP on `close`."""

    def __init__(self, model: nn.Module, *, heartbeat_s: float = 60.0) -> None:
        if dist.get_rank() != 0:
            raise ValueError(f"the leader is rank 0; this is rank {dist.get_rank()} (call follow())")
        self.lock = threading.Lock()  # one collective sequence at a time: forwards and heartbeats
        self.broken: str | None = None
        self.holding = False  # the lock is held for a forward in flight
        self.last = time.monotonic()
        self.heartbeat_s = heartbeat_s
        self.hooks = [model.register_forward_pre_hook(self._before),
                      model.register_forward_hook(self._after, always_call=True)]
        self.stopped = threading.Event()
        self.beat = threading.Thread(target=self._heartbeat, name="moekit-ep-heartbeat", daemon=True)
        self.beat.start()

    def _before(self, module: nn.Module, args: tuple) -> None:
        if self.broken is not None:
            raise RuntimeError(f"the expert-parallel ranks are out of step since a failed forward "
                               f"({self.broken}); restart the run")
        self.lock.acquire()
        self.holding = True
        _send(FORWARD)

    def _after(self, module: nn.Module, args: tuple, output: object) -> None:
        """Runs after every forward, also one that raised (always_call hooks then see None)."""
        if not self.holding:  # refused in _before: nothing was sent
            return
        if output is None:
            self.broken = "a forward raised on rank 0 after the followers started it"
        self.last = time.monotonic()
        self.holding = False
        self.lock.release()

    def _heartbeat(self) -> None:
        while not self.stopped.wait(self.heartbeat_s / 2):
            with self.lock:
                if self.broken is None and not self.stopped.is_set() \
                        and time.monotonic() - self.last >= self.heartbeat_s / 2:
                    _send(HEARTBEAT)
                    self.last = time.monotonic()

    def close(self) -> None:
        """Stop the followers (they return from `follow`) and unhook the model."""
        self.stopped.set()
        self.beat.join()
        for hook in self.hooks:
            hook.remove()
        if self.broken is None:
            with self.lock:
                _send(STOP)


def serve_experts(layer: MoELayer) -> None:
    """A follower's part of one forward of `layer`: no tokens of its own, its experts for rank 0's rows."""
    cfg = layer.config
    w = next(layer.experts.parameters())
    K, E = cfg.top_k, cfg.num_experts
    empty_TK = torch.empty(0, K, device=w.device)
    logits_TE = torch.empty(0, E, device=w.device)
    decision = RoutingDecision(expert_ids_TK=empty_TK.long(), weights_TK=empty_TK, logits_TE=logits_TE,
                               probs_TE=logits_TE, counts_E=torch.zeros(E, dtype=torch.long, device=w.device))
    x_RD, counts_e, plan = layer.dispatcher.dispatch(torch.empty(0, cfg.d_model, dtype=w.dtype, device=w.device),
                                                     decision)
    layer.dispatcher.combine(layer.experts(x_RD, counts_e), plan)


@torch.inference_mode()
def follow(model: nn.Module) -> int:
    """A follower's loop: run the experts of every forward rank 0 announces; returns the number of
    forwards once rank 0 sends STOP."""
    layers = moe_layers(model)
    forwards = 0
    command = torch.zeros(1, dtype=torch.long)
    while True:
        dist.broadcast(command, src=0)
        kind = int(command)
        if kind == STOP:
            return forwards
        if kind == FORWARD:
            for layer in layers:
                serve_experts(layer)
            forwards += 1
        elif kind != HEARTBEAT:
            raise RuntimeError(f"unknown command {kind} from rank 0")


def saved_num_experts(folder: str | Path) -> int | None:
    """The routed-expert count of a model directory's config, read without its weights (None: dense)."""
    from moekit.hf.families import family
    from moekit.hf.io import CONFIG_FILE, read_config
    from moekit.hf.native import is_native, read_native
    from moekit.inference.load import model_dir

    folder = model_dir(folder)
    if is_native(folder):
        config = read_native(folder).config
    else:
        hf_config = read_config(folder)
        config = family(hf_config.get("model_type"), where=str(folder / CONFIG_FILE)).config_from_hf(
            hf_config, source=str(folder / CONFIG_FILE))
    moe = getattr(config, "moe", None)
    return None if moe is None else moe.num_experts


def check_inference_launch(*, expert_parallel: int | None, path: str | Path, weights: dict,
                           env: dict[str, str] | None = None) -> int:
    """The number of ranks generation will use; a ValueError naming the numbers when they do not fit."""
    from moekit.parallel.launch import launched_by_torchrun
    from moekit.parallel.mesh import check_sizes

    env = dict(os.environ) if env is None else env
    ep = 1 if expert_parallel is None else expert_parallel
    if ep < 1:
        raise ValueError(f"--expert-parallel {ep} is invalid: must be >= 1")
    if not launched_by_torchrun(env):
        if ep != 1:
            raise ValueError(f"--expert-parallel {ep} needs {ep} processes; launch with "
                             f"torchrun --nproc-per-node {ep} -m moekit generate|serve ... (WORLD_SIZE is not set)")
        return 1
    world = int(env["WORLD_SIZE"])
    if world != ep:
        raise ValueError(f"generation runs one expert-parallel group: the world size {world} must equal "
                         f"--expert-parallel {expert_parallel}; launch torchrun --nproc-per-node {ep} "
                         f"(rank 0 serves, the others hold the rest of the experts)")
    if ep > 1 and weights:
        raise ValueError(f"--expert-parallel {ep} holds each rank's experts in memory; it does not combine "
                         f"with {', '.join(sorted(weights))} (drop those flags or run one process)")
    num_experts = saved_num_experts(path)
    if ep > 1 and num_experts is None:
        raise ValueError(f"--expert-parallel {ep} needs a model with MoE layers; {path} has none")
    check_sizes(world_size=world, expert_parallel=ep, num_experts=num_experts)
    return world


def run_generation(path: str | Path, *, expert_parallel: int | None, dtype: str | None, weights: dict,
                   lead: Callable[[LoadedModel], int]) -> int:
    """Load `path` and call `lead(loaded)`: in this process, or on rank 0 of an expert-parallel group
    (torchrun) while the other ranks follow; returns lead's result (0 on the followers)."""
    from moekit.inference.load import load
    from moekit.parallel.launch import shutdown
    from moekit.parallel.mesh import build_mesh

    world = check_inference_launch(expert_parallel=expert_parallel, path=path, weights=weights)
    if world == 1:
        return lead(load(path, dtype=dtype, **weights))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        mesh = build_mesh(expert_parallel=world)
        loaded = load(path, dtype=dtype)
        shard_for_inference(loaded.model, mesh)
        if dist.get_rank() != 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a follower ends when rank 0 ends
            follow(loaded.model)
            return 0
        leader = Leader(loaded.model)
        try:
            return lead(loaded)
        finally:
            leader.close()
    finally:
        shutdown()
