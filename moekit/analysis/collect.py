"""Run a model over batches and collect its routing trace (the first step of every analysis).

Batches are token tensors (B, S) or (tokens_BS, mask_BS) pairs; labels give each sequence's domain.
`analyze`, knock-out and router saturation all read the model through these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.analysis.trace import RoutingTrace, concat_traces, trace_from_routing

Batch = Tensor | tuple[Tensor, Tensor | None]


def split_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """(tokens_BS, mask_BS or None) of one batch; a TypeError for anything else."""
    if isinstance(batch, Tensor):
        tokens_BS, mask_BS = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        tokens_BS, mask_BS = batch
    else:
        raise TypeError(f"a batch must be tokens_BS (B, S) or (tokens_BS, mask_BS); got {type(batch).__name__}")
    if not isinstance(tokens_BS, Tensor) or tokens_BS.dim() != 2:
        raise TypeError(f"tokens_BS must be a 2-D integer tensor (batch, seq); got "
                        f"{getattr(tokens_BS, 'shape', type(tokens_BS).__name__)}")
    if mask_BS is not None and tuple(mask_BS.shape) != tuple(tokens_BS.shape):
        raise ValueError(f"mask_BS has shape {tuple(mask_BS.shape)}; expected {tuple(tokens_BS.shape)}")
    return tokens_BS, mask_BS


@torch.no_grad()
def collect_trace(model: nn.Module, batches: Sequence[Batch], labels: Sequence[Tensor] | None = None, *,
                  label_names: Sequence[str] = ()) -> RoutingTrace:
    """Run `model` (eval mode) on each batch and trace its routing (padding left out).

    labels: one long (B,) tensor per batch, each sequence's domain (index into label_names).
    """
    if labels is not None and len(labels) != len(batches):
        raise ValueError(f"got {len(labels)} label tensors for {len(batches)} batches; give one (B,) "
                         f"tensor of domain indices per batch")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    traces, first = [], 0
    try:
        for i, batch in enumerate(batches):
            tokens_BS, mask_BS = split_batch(batch)
            labels_B = None if labels is None else torch.as_tensor(labels[i]).long()
            if labels_B is not None and labels_B.shape != (tokens_BS.shape[0],):
                raise ValueError(f"labels[{i}] has shape {tuple(labels_B.shape)}; expected "
                                 f"({tokens_BS.shape[0]},), one domain per sequence")
            out = model(tokens_BS.to(device), mask_BS=None if mask_BS is None else mask_BS.to(device))
            if not any(d is not None for d in out.routing):
                raise ValueError("the model has no MoE layer (every routing entry is None); nothing to analyze")
            traces.append(trace_from_routing(out.routing, tokens_BS, mask_BS=mask_BS, labels_B=labels_B,
                                             label_names=tuple(label_names), first_sequence=first))
            first += tokens_BS.shape[0]
    finally:
        model.train(was_training)
    if not traces:
        raise ValueError("no batches to analyze; pass at least one (B, S) token tensor")
    return concat_traces(traces)
