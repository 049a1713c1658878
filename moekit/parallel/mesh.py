"""The device mesh of a run: `dp` x `ep` ranks, and the checks that the numbers fit.

Experts are sharded over `ep` (consecutive ranks); data is split over all `dp * ep` ranks, so
expert parallelism borrows its ranks from data parallelism (as torchtitan does). Rank
r = dp_index * ep + ep_index.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def check_sizes(*, world_size: int, expert_parallel: int, num_experts: int | None = None,
                batch_size: int | None = None) -> None:
    """ValueError naming the numbers when experts, ranks and the global batch do not divide."""
    if expert_parallel < 1:
        raise ValueError(f"--expert-parallel {expert_parallel} is invalid: must be >= 1")
    if world_size % expert_parallel:
        raise ValueError(f"world size {world_size} is not divisible by --expert-parallel {expert_parallel}; "
                         f"launch a multiple of {expert_parallel} processes (torchrun --nproc-per-node)")
    if num_experts is not None and num_experts % expert_parallel:
        raise ValueError(f"num_experts={num_experts} is not divisible by --expert-parallel "
                         f"{expert_parallel}; "
                         f"each rank must hold the same number of experts")
    if batch_size is not None and batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} (the global batch) does not split over {world_size} "
                         f"processes; use a multiple of {world_size}")


def build_mesh(*, expert_parallel: int, device_type: str = "cpu") -> DeviceMesh:
    """A 2-D mesh ("dp", "ep") over every rank of the initialised default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"expert parallelism ({expert_parallel} ranks) needs torch.distributed: launch with "
                         f"torchrun --nproc-per-node N -m moekit ...")
    world = dist.get_world_size()
    check_sizes(world_size=world, expert_parallel=expert_parallel)
    return init_device_mesh(device_type, (world // expert_parallel, expert_parallel),
                            mesh_dim_names=("dp", "ep"))
