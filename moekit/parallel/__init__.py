"""moekit.parallel: expert and data parallelism over torch.distributed (torchrun, gloo / NCCL).

    mesh = build_mesh(expert_parallel=EP)     # ("dp", "ep") over every rank
    parallelize(model, mesh)                  # expert shards + all-to-all dispatch, in place
    Trainer(model, ..., parallel=Distributed(mesh))
"""

from moekit.parallel.context import Distributed, SingleProcess
from moekit.parallel.launch import check_launch, init_from_environment, shutdown
from moekit.parallel.mesh import build_mesh, check_sizes
from moekit.parallel.shard import ExpertShard, full_tensors, local_tensors, parallelize, shard_experts

__all__ = [
    "Distributed", "ExpertShard", "SingleProcess", "build_mesh", "check_launch", "check_sizes",
    "full_tensors", "init_from_environment", "local_tensors", "parallelize", "shard_experts", "shutdown",
]
