"""moekit.parallel: expert and data parallelism over torch.distributed (torchrun, gloo / NCCL).

    mesh = build_mesh(expert_parallel=EP)     # ("dp", "ep") over every rank
    parallelize(model, mesh)                  # expert shards + all-to-all dispatch, in place
    Trainer(model, ..., parallel=Distributed(mesh))
    shard_for_inference(model, mesh); Leader(model) on rank 0, follow(model) elsewhere   # generation
"""

from moekit.parallel.context import Distributed, SingleProcess
from moekit.parallel.launch import check_launch, init_from_environment, shutdown
from moekit.parallel.mesh import build_mesh, check_sizes
from moekit.parallel.serving import Leader, follow, shard_for_inference
from moekit.parallel.shard import ExpertShard, full_tensors, local_tensors, parallelize, shard_experts

__all__ = [
    "Distributed", "ExpertShard", "Leader", "SingleProcess", "build_mesh", "check_launch", "check_sizes",
    "follow", "full_tensors", "init_from_environment", "local_tensors", "parallelize", "shard_experts",
    "shard_for_inference", "shutdown",
]
