"""Code the spawned gloo ranks of the expert-parallel tests run (importable, so spawn can find it).

Each check builds the one-process reference on every rank from the same seed and full input,
and compares this rank's share of it with the expert-parallel result. Failures raise inside the
rank, which makes `mp.spawn` raise in the test.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from moekit.config import MoEConfig
from moekit.dispatch.all_to_all import AllToAllDispatcher
from moekit.layer import MoELayer
from moekit.parallel import Distributed, ExpertShard, build_mesh, parallelize
from moekit.types import RoutingDecision

RTOL, ATOL = 1e-5, 1e-6
T_PER_RANK, D, E = 12, 8, 8


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"rank {dist.get_rank()}: {what}: {m}")


def skewed_decision(T: int, K: int, *, seed: int, rank: int) -> RoutingDecision:
    """Ids skewed to low experts (experts 6, 7 get nothing; rank 0 also uses only 0 and 1), some -1 slots."""
    g = torch.Generator().manual_seed(seed + rank)
    high = 2 if rank == 0 else 6
    ids_TK = torch.randint(0, high, (T, K), generator=g)
    ids_TK[torch.rand(T, K, generator=g) < 0.2] = -1
    ids_TK[0] = -1  # a token with no expert at all
    w_TK = torch.rand(T, K, generator=g).masked_fill(ids_TK < 0, 0.0)
    logits_TE = torch.zeros(T, E)
    counts_E = torch.bincount(ids_TK[ids_TK >= 0], minlength=E)
    return RoutingDecision(ids_TK, w_TK, logits_TE, logits_TE.softmax(-1), counts_E)


def check_identity(rank: int, ep_group: dist.ProcessGroup) -> None:
    """dispatch then combine with identity experts: y_t = x_t * sum of its weights; gradients too."""
    K = 2
    d = skewed_decision(T_PER_RANK, K, seed=0, rank=rank)
    weights_TK = d.weights_TK.clone().requires_grad_()
    d = replace(d, weights_TK=weights_TK)
    x_TD = torch.randn(T_PER_RANK, D, generator=torch.Generator().manual_seed(100 + rank)).requires_grad_()
    dispatcher = AllToAllDispatcher(ep_group, num_experts=E)
    x_RD, counts_e, plan = dispatcher.dispatch(x_TD, d)
    assert x_RD.shape[0] == int(counts_e.sum()), "rows and counts disagree"
    # The counts my experts receive are the sum of every ep peer's counts for them.
    all_counts = d.counts_E.clone()
    dist.all_reduce(all_counts, group=ep_group)
    e = E // dist.get_world_size(ep_group)
    r = dist.get_rank(ep_group)
    assert counts_e.tolist() == all_counts[r * e:(r + 1) * e].tolist(), (counts_e, all_counts)
    y_TD = dispatcher.combine(x_RD, plan)
    close(y_TD, x_TD * weights_TK.sum(-1, keepdim=True), "identity output")
    g_TD = torch.randn(T_PER_RANK, D, generator=torch.Generator().manual_seed(200 + rank))
    (y_TD * g_TD).sum().backward()
    close(x_TD.grad, g_TD * weights_TK.detach().sum(-1, keepdim=True), "identity input grad")
    expected_w = ((g_TD * x_TD.detach()).sum(-1, keepdim=True) * (d.expert_ids_TK >= 0)).expand(-1, K)
    close(weights_TK.grad, expected_w, "identity weight grad")


def layer_config(case: str) -> MoEConfig:
    base = MoEConfig(d_model=D, d_ff=16, num_experts=E, top_k=2, load_balance_coef=0.01, z_loss_coef=0.001,
                     num_shared_experts=1)
    return {
        "dropless": base,
        "capacity-sequence": replace(base, capacity_factor=0.75, capacity_group="sequence"),
        "global-balance-bias": replace(base, load_balance_granularity="global", expert_bias=True,
                                       bias_update_rate=0.1),
        "capacity-batch": replace(base, capacity_factor=0.75, load_balance_coef=0.0),
    }[case]


def check_layer(rank: int, world: int, mesh, case: str) -> None:
    """An EP layer equals the one-process layer on the whole batch: outputs, all gradients, losses."""
    cfg = layer_config(case)
    torch.manual_seed(0)
    ref = MoELayer(cfg)
    with torch.no_grad():
        ref.router.gate.weight[6:] -= 3.0  # experts 6 and 7 receive (almost) nothing
        if cfg.expert_bias:
            ref.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, E))
    ep_layer = parallelize_layer(copy.deepcopy(ref), mesh)
    B = 3  # sequences per rank
    S = T_PER_RANK // B
    g = torch.Generator().manual_seed(7)
    x_full = torch.randn(world * B, S, D, generator=g)
    grad_full = torch.randn(world * B, S, D, generator=g)
    mine = slice(rank * B, (rank + 1) * B)

    ref.train()
    ep_layer.train()
    x_ref = x_full.clone().requires_grad_()
    if case == "capacity-batch":
        # Capacity is counted per rank's micro-batch (GShard's groups): the one-process reference
        # runs the layer on each rank's share separately.
        outs = [ref(x_ref[r * B:(r + 1) * B]) for r in range(world)]
        y_ref = torch.cat([o.y for o in outs])
        aux_ref = {k: sum(o.aux_losses[k] for o in outs) / world for k in outs[0].aux_losses}
    else:
        out_ref = ref(x_ref)
        y_ref, aux_ref = out_ref.y, out_ref.aux_losses
    loss_ref = (y_ref * grad_full).sum() + ref.aux_loss(aux_ref)
    loss_ref.backward()

    x = x_full[mine].clone().requires_grad_()
    out = ep_layer(x)
    # Each rank's aux losses are means over its share: the one-process value is their average.
    loss = (out.y * grad_full[mine]).sum() + ep_layer.aux_loss(out.aux_losses) / world
    loss.backward()

    close(out.y, y_ref[mine].detach(), f"{case}: output")
    close(x.grad, x_ref.grad[mine], f"{case}: input grad")
    for name, value in out.aux_losses.items():
        mean = value.detach().clone()
        dist.all_reduce(mean)
        close(mean / world, aux_ref[name].detach(), f"{case}: aux loss {name}")
    shard = ep_layer.experts
    assert isinstance(shard, ExpertShard)
    lo, hi = shard.first, shard.first + shard.num_experts
    for name, p in ep_layer.named_parameters():
        grad = p.grad.clone()
        ref_grad = dict(ref.named_parameters())[name].grad
        if name.startswith("experts."):
            dist.all_reduce(grad, group=mesh["dp"].get_group())  # ep peers' tokens are already in it
            close(grad, ref_grad[lo:hi], f"{case}: grad {name}")
        else:
            dist.all_reduce(grad)
            close(grad, ref_grad, f"{case}: grad {name}")
    if cfg.expert_bias:
        # Aux-loss-free bias step from the whole batch's loads, as on one process.
        Distributed(mesh).before_bias_update(_Wrap(ep_layer))
        ep_layer.update_expert_bias()
        ref.update_expert_bias()
        close(ep_layer.router.expert_bias, ref.router.expert_bias, f"{case}: expert bias after update")
        assert not torch.equal(ref.router.expert_bias, torch.linspace(-0.2, 0.2, E)), "bias did not move"


class _Wrap(torch.nn.Module):
    """A model holding one layer, for the context's model-level methods."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def moe_layers(self) -> list[MoELayer]:
        return [self.layer]


def parallelize_layer(layer: MoELayer, mesh) -> MoELayer:
    return parallelize(_Wrap(layer), mesh).layer


def run(rank: int, world: int, port: int, ep_sizes: tuple[int, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for ep in ep_sizes:
            mesh = build_mesh(expert_parallel=ep)
            check_identity(rank, mesh["ep"].get_group())
            for case in ("dropless", "capacity-sequence", "global-balance-bias", "capacity-batch"):
                check_layer(rank, world, mesh, case)
    finally:
        dist.destroy_process_group()
