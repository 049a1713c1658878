"""Start or skip torch.distributed from the environment torchrun sets (RANK, WORLD_SIZE, ...).

`init_from_environment(expert_parallel=EP, ...)` returns `SingleProcess()` outside torchrun and a
`Distributed` context on a ("dp", "ep") mesh inside it (gloo on CPU; NCCL for CUDA tensors plus
gloo for the few CPU ones). Sizes that do not divide are a ValueError before any work starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from moekit.parallel.context import Distributed, SingleProcess
from moekit.parallel.mesh import build_mesh, check_sizes


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env and "RANK" in env


def check_launch(*, expert_parallel: int | None, num_experts: int | None, batch_size: int,
                 env: Mapping[str, str] | None = None) -> int:
    """The world size the run will have; a ValueError naming the numbers when they do not fit."""
    env = os.environ if env is None else env
    ep = 1 if expert_parallel is None else expert_parallel
    if not launched_by_torchrun(env):
        if ep != 1:
            raise ValueError(f"--expert-parallel {ep} needs {ep} or a multiple of {ep} processes; "
                             f"launch with "
                             f"torchrun --nproc-per-node {ep} -m moekit train ... (WORLD_SIZE is not set)")
        return 1
    world = int(env["WORLD_SIZE"])
    if ep > 1 and num_experts is None:
        raise ValueError(f"--expert-parallel {ep} needs a model with MoE layers; this one has none")
    check_sizes(world_size=world, expert_parallel=ep, num_experts=num_experts, batch_size=batch_size)
    return world


def init_from_environment(*, expert_parallel: int | None, device: str) -> tuple[SingleProcess, torch.device]:
    """The run's context and its device (cuda:LOCAL_RANK for a CUDA run under torchrun)."""
    if not launched_by_torchrun():
        return SingleProcess(), torch.device(device)
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo")
    mesh = build_mesh(expert_parallel=expert_parallel or 1, device_type=dev.type)
    return Distributed(mesh), dev


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
