"""Shard a built model over a ("dp", "ep") mesh, and gather it back into full tensors.

`parallelize(model, mesh)` replaces each MoE layer's experts by the slice its `ep` rank holds
(`ExpertShard`, the same `Experts` module with e = E / ep experts) and its dispatcher by the
all-to-all dispatcher, and tells the layer which ranks hold one micro-batch (for the balance
loss). The model code itself has no distributed branch. `full_tensors` / `load_full_tensors`
move between a sharded model and the one-process names and shapes (checkpoints, final weights).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moekit.config import MoEConfig
from moekit.dispatch.all_to_all import AllToAllDispatcher
from moekit.experts.grouped import Experts
from moekit.layer import moe_layers

LOAD_COUNTS = "load_counts_E"  # the layers' per-rank routing counters (summed over ranks when saved)


class ExpertShard(Experts):
    """Experts [first, first + num_experts) of a layer with `num_global` experts."""

    def __init__(self, config: MoEConfig, *, first: int, num_experts: int, fuse_gate_up: bool = False,
                 decode_max_rows: int = 64) -> None:
        super().__init__(config, num_experts=num_experts, fuse_gate_up=fuse_gate_up,
                         decode_max_rows=decode_max_rows)
        self.first = first
        self.num_global = config.num_experts


def shard_experts(experts: Experts, *, rank: int, size: int) -> ExpertShard:
    """The experts of `rank` out of `size`, with copies of their weights (same device and dtype)."""
    E = experts.num_experts
    if E % size:
        raise ValueError(f"num_experts={E} is not divisible by the expert-parallel size {size}")
    e = E // size
    p0 = next(experts.parameters())
    with torch.random.fork_rng(devices=[]):  # its throw-away init must not advance the global RNG
        shard = ExpertShard(experts.config, first=rank * e, num_experts=e, fuse_gate_up=experts.fuse_gate_up,
                            decode_max_rows=experts.decode_max_rows).to(device=p0.device, dtype=p0.dtype)
    with torch.no_grad():
        for name, p in shard.named_parameters():
            p.copy_(getattr(experts, name)[rank * e:(rank + 1) * e])
    return shard


def parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard `model`'s experts over mesh["ep"] and route tokens by all-to-all; returns `model`.

    Every rank must have built the same full model (same seed or weights). The mesh must span the
    whole default process group: data is split over all its ranks.
    """
    if mesh.mesh_dim_names != ("dp", "ep"):
        raise ValueError(f"parallelize needs a mesh with dims ('dp', 'ep'), got {mesh.mesh_dim_names}")
    if mesh.size() != dist.get_world_size():
        raise ValueError(f"the mesh has {mesh.size()} ranks but the process group {dist.get_world_size()}; "
                         f"build it with moekit.parallel.build_mesh")
    ep_mesh = mesh["ep"]
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    layers = moe_layers(model)
    for layer in layers:
        E = layer.config.num_experts
        if E % ep:
            raise ValueError(f"num_experts={E} is not divisible by --expert-parallel {ep}")
        if layer.config.router == "soft":
            raise ValueError("router='soft' mixes every token into every expert's slots; it has no "
                             "expert-parallel dispatch (use a token-choice router)")
        if not isinstance(layer.experts, Experts) or isinstance(layer.experts, ExpertShard):
            raise TypeError(f"parallelize expects unsharded moekit Experts, got "
                            f"{type(layer.experts).__name__}")
    group = ep_mesh.get_group()
    for layer in layers:
        layer.experts = shard_experts(layer.experts, rank=rank, size=ep)
        layer.dispatcher = AllToAllDispatcher(group, num_experts=layer.config.num_experts)
        layer.batch_group = dist.group.WORLD
    return model


def expert_shard_names(model: nn.Module) -> dict[str, ExpertShard]:
    """Name of every parameter held by an ExpertShard -> that shard."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertShard):
            for name, _ in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}"] = module
    return out


def gather_dim0(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """On group rank 0: `t` of every rank of `group` concatenated along dim 0 (group-rank order).
    Elsewhere `t` itself (only the writing rank needs the whole)."""
    root = dist.get_rank(group) == 0
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))] if root else None
    dist.gather(t.contiguous(), parts, group=group, group_dst=0)
    return torch.cat(parts) if parts is not None else t


def full_tensors(model: nn.Module, named: dict[str, Tensor], mesh: DeviceMesh) -> dict[str, Tensor]:
    """One-process tensors on rank 0 from every rank's `named` ones (every rank must call it).

    Expert-shard parameters are gathered over the ep group of rank 0 (the other dp groups hold
    copies and skip it); routing counters are summed over all ranks; the rest is replicated as is.
    Ranks other than 0 get their own tensors back for the sharded names.
    """
    shards = expert_shard_names(model)
    group = mesh["ep"].get_group()
    gathers = mesh["dp"].get_local_rank() == 0
    out = {}
    for name, t in named.items():
        if name in shards:
            out[name] = gather_dim0(t.detach(), group) if gathers else t
        elif name.endswith(LOAD_COUNTS):
            total = t.detach().clone()
            dist.all_reduce(total)
            out[name] = total
        else:
            out[name] = t
    return out


def local_tensors(model: nn.Module, full: dict[str, Tensor], mesh: DeviceMesh) -> dict[str, Tensor]:
    """This rank's slice of one-process tensors (the inverse of `full_tensors`, for any mesh)."""
    shards = expert_shard_names(model)
    writer = dist.get_rank() == 0
    out = {}
    for name, t in full.items():
        shard = shards.get(name)
        if shard is not None:
            if t.shape[0] != shard.num_global:
                raise ValueError(f"{name} has {t.shape[0]} experts saved; this model has {shard.num_global}")
            out[name] = t[shard.first:shard.first + shard.num_experts]
        elif name.endswith(LOAD_COUNTS):
            out[name] = t if writer else torch.zeros_like(t)  # the sum lives on rank 0 alone
        else:
            out[name] = t
    return out
