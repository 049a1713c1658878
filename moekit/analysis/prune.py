"""Prune the least-used experts of every MoE layer, optionally merging each into a survivor.

A pruned layer keeps the same number N of experts in every MoE layer (`MoEConfig.num_experts` is
one field for all layers, as in the Hugging Face configs moekit writes), chosen per layer by load:
    keep=N: each layer's N most used experts;
    drop_below=F: experts with at least a fraction F of their layer's slots survive, and N is the
        largest survivor count over the layers (no layer loses an expert above the threshold; other
        layers keep their N most used).
The router keeps the survivors' gate rows, so every token picks its top-k among the survivors and
the combine weights are renormalised over them (exactly knock-out's "router" method). With
`merge`, each dropped expert's weights are averaged into the survivor it is most often co-activated
with (P(survivor | dropped)), weighted by the two experts' token counts (frequency-weighted
merging, as in M-SMoE); a dropped expert that received no tokens is simply removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

PRUNABLE_ROUTERS = ("topk", "sparsemixer", "sinkhorn", "expert_choice")
_EXPERT_ROWS = ("router.gate.weight", "router.gate.bias", "router.noise_gate.weight", "router.expert_bias")


def plan_keep(counts: Sequence[Tensor], *, keep: int | None = None, drop_below: float | None = None) -> list[list[int]]:
    """Expert ids (ascending) each MoE layer keeps; `counts[l]` is layer l's tokens per expert."""
    if (keep is None) == (drop_below is None):
        raise ValueError("give exactly one of keep=N or drop_below=FRACTION")
    E = len(counts[0])
    if keep is not None:
        if not isinstance(keep, int) or not 1 <= keep <= E:
            raise ValueError(f"keep={keep!r} is invalid: must be an integer in [1, {E}] (the layer has {E} experts)")
        n = keep
    else:
        if not 0.0 <= float(drop_below) < 1.0:  # type: ignore[arg-type]
            raise ValueError(f"drop_below={drop_below!r} is invalid: must be a load fraction in [0, 1)")
        survivors = [int((c.float() / c.sum().clamp_min(1) >= drop_below).sum()) for c in counts]
        n = max(max(survivors), 1)
    return [sorted(torch.argsort(c, descending=True, stable=True)[:n].tolist()) for c in counts]


def _merge_into(kept: list[int], counts_E: Tensor, coact_EE: Tensor) -> dict[int, list[int]]:
    """survivor -> dropped experts merged into it (each dropped expert with tokens goes to the
    survivor with the highest P(survivor | dropped); ties to the lower id)."""
    E = counts_E.numel()
    targets: dict[int, list[int]] = {s: [] for s in kept}
    kept_t = torch.tensor(kept)
    for d in range(E):
        if d in kept or int(counts_E[d]) == 0:
            continue
        p = coact_EE[d, kept_t]
        targets[kept[int(torch.argmax(p))]].append(d)
    return targets


@torch.no_grad()
def prune_model(model: nn.Module, keep_ids: Sequence[Sequence[int]], *, merge: bool = False,
                counts: Sequence[Tensor] | None = None, coactivation: Sequence[Tensor] | None = None) -> nn.Module:
    """A new MoETransformer with only `keep_ids[l]` experts in MoE layer l (same N per layer).

    merge: average each dropped expert into its most co-activated survivor; needs `counts` (tokens
    per expert per layer) and `coactivation` (P(b|a), (E, E), per layer).
    """
    from moekit.model import MoETransformer

    config = model.config
    moe = config.moe
    if moe is None or not hasattr(model, "moe_layers"):
        raise ValueError("prune needs a MoETransformer with MoE layers")
    if moe.router not in PRUNABLE_ROUTERS:
        raise ValueError(f"router={moe.router!r} cannot be pruned (its routing is not a gate over experts); "
                         f"prunable routers: {PRUNABLE_ROUTERS}")
    if moe.num_groups is not None:
        raise ValueError("group-limited routing (num_groups) ties experts to groups; prune it without "
                         "groups is not supported")
    layers = model.moe_layers()
    if len(keep_ids) != len(layers):
        raise ValueError(f"keep_ids has {len(keep_ids)} layers; the model has {len(layers)} MoE layers")
    n = {len(k) for k in keep_ids}
    if len(n) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts (got {sorted(n)}); "
                         f"MoEConfig.num_experts is one value for all layers")
    N = n.pop()
    if any(len(set(k)) != N or min(k) < 0 or max(k) >= moe.num_experts for k in keep_ids):
        raise ValueError(f"keep_ids must be distinct expert ids in [0, {moe.num_experts - 1}] per layer")
    if merge and (counts is None or coactivation is None):
        raise ValueError("merge needs counts and coactivation (from an analysis of the model)")
    new_moe = replace(moe, num_experts=N, top_k=min(moe.top_k, N))
    pruned = MoETransformer(config.replace(moe=new_moe))
    dtype = next(model.parameters()).dtype
    pruned = pruned.to(dtype)
    state = model.state_dict()
    prefix_of = {id(layer): name for name, layer in model.named_modules() if any(layer is x for x in layers)}
    rows: dict[str, tuple[int, str]] = {}  # state key -> (MoE layer position, key inside the layer)
    for pos, layer in enumerate(layers):
        prefix = prefix_of[id(layer)] + "."
        for key in state:
            if key.startswith(prefix):
                local = key[len(prefix):]
                if local in _EXPERT_ROWS or local.startswith("experts."):
                    rows[key] = (pos, local)
    new_state = {}
    for key, value in state.items():
        if key not in rows:
            new_state[key] = value
            continue
        pos, local = rows[key]
        kept = torch.tensor(list(keep_ids[pos]))
        if merge and local.startswith("experts."):
            assert counts is not None and coactivation is not None
            value = _merged(value, list(keep_ids[pos]), counts[pos], coactivation[pos])
        new_state[key] = value[kept].clone()
    missing, unexpected = pruned.load_state_dict(new_state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("load_counts_E")]:
        raise ValueError(f"pruned state does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "hf_config"):
        pruned.hf_config = dict(model.hf_config)  # type: ignore[attr-defined]
    return pruned.eval()


def _merged(w_E: Tensor, kept: list[int], counts_E: Tensor, coact_EE: Tensor) -> Tensor:
    """`w_E` with each survivor replaced by the token-count-weighted average of itself and the
    dropped experts merged into it."""
    out = w_E.clone()
    for s, dropped in _merge_into(kept, counts_E, coact_EE).items():
        if not dropped:
            continue
        group = [s, *dropped]
        n = counts_E[group].to(torch.float64)
        if float(n.sum()) == 0:
            continue
        weights = (n / n.sum()).to(w_E.dtype).reshape(-1, *[1] * (w_E.dim() - 1))
        out[s] = (w_E[group] * weights).sum(0)
    return out
