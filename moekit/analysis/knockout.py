"""Knock-out: the loss of a model with experts (or the shared expert) disabled, against the full model.

Two ways to disable a routed expert (`method`):
    "router": its router logit is pushed to -1e9 (and its selection bias, if any), so every token
        picks its top-k among the other experts and the combine weights are renormalised over
        them: the model as if the expert had been pruned (what `moekit prune` does). The `topk`
        router only (sparsemixer's gate has no bias to carry the mask).
    "zero": the expert's output projection is zeroed, so its slots contribute nothing and the
        other weights are not renormalised. Works for every router (expert choice, hash, ...).
"auto" takes "router" where it applies, else "zero". A shared expert is always disabled by zeroing
its output projection. Weights are changed in place inside a context manager and restored after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moekit.layer import MoELayer

MASK_LOGIT = -1e9  # exp(-1e9 - max) is exactly 0 in fp32: the expert gets no probability
TOKEN_CHOICE = ("topk",)  # routers whose logits use gate.bias (sparsemixer ignores a bias)


def resolve_method(layer: MoELayer, method: str) -> str:
    if method not in ("auto", "router", "zero"):
        raise ValueError(f"knock-out method={method!r} is invalid: must be 'auto', 'router' or 'zero'")
    if method == "auto":
        return "router" if layer.config.router in TOKEN_CHOICE else "zero"
    if method == "router" and layer.config.router not in TOKEN_CHOICE:
        raise ValueError(f"knock-out method='router' needs a token-choice router ({TOKEN_CHOICE}); this "
                         f"layer has router={layer.config.router!r}; use method='zero'")
    return method


@contextmanager
def experts_disabled(layer: MoELayer, experts: Sequence[int], *, method: str = "auto") -> Iterator[None]:
    """Disable routed `experts` of `layer` inside the block (see the module docstring)."""
    E = layer.config.num_experts
    bad = [e for e in experts if not 0 <= e < E]
    if bad:
        raise ValueError(f"experts {bad} do not exist; the layer has experts 0..{E - 1}")
    method = resolve_method(layer, method)
    idx = torch.tensor(list(experts), dtype=torch.long)
    saved: list[tuple[Tensor, Tensor]] = []
    added_bias = None
    with torch.no_grad():
        if method == "router":
            gate: nn.Linear = layer.router.gate  # type: ignore[assignment]
            if gate.bias is None:
                added_bias = nn.Parameter(torch.zeros(E, device=gate.weight.device, dtype=gate.weight.dtype),
                                          requires_grad=False)
                gate.bias = added_bias
            targets = [gate.bias]
            if getattr(layer.router, "expert_bias", None) is not None:
                targets.append(layer.router.expert_bias)  # type: ignore[arg-type]
            for t in targets:
                saved.append((t, t.detach().clone()))
                t[idx.to(t.device)] = MASK_LOGIT
        else:
            w_out, b_out = layer.experts.output_projection()
            for t in (w_out, b_out):
                if t is not None:
                    saved.append((t, t.detach().clone()))
                    t[idx.to(t.device)] = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
            if added_bias is not None:
                layer.router.gate.bias = None  # type: ignore[union-attr]


@contextmanager
def shared_disabled(layer: MoELayer) -> Iterator[None]:
    """Zero the shared experts' output projection of `layer` inside the block."""
    if layer.shared_experts is None:
        raise ValueError("this MoE layer has no shared expert to disable")
    down = layer.shared_experts.down_proj
    saved = [(t, t.detach().clone()) for t in (down.weight, down.bias) if t is not None]
    with torch.no_grad():
        for t, _ in saved:
            t.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)


@torch.no_grad()
def eval_loss(model: nn.Module, batches: Sequence) -> float:
    """Mean next-token loss over every batch, predicting each sequence's next token (padding and
    each sequence's last token have no target)."""
    from moekit.analysis.collect import split_batch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in batches:
            tokens_BS, mask_BS = split_batch(batch)
            tokens_BS = tokens_BS.long()
            targets_BS = torch.full_like(tokens_BS, -100)
            targets_BS[:, :-1] = tokens_BS[:, 1:]
            if mask_BS is not None:
                targets_BS[:, :-1][~(mask_BS[:, :-1].bool() & mask_BS[:, 1:].bool())] = -100
            n = int((targets_BS != -100).sum())
            if n == 0:
                continue
            out = model(tokens_BS.to(device), targets_BS=targets_BS.to(device),
                        mask_BS=None if mask_BS is None else mask_BS.to(device))
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no next-token targets in the batches (sequences of length 1?); cannot compute a loss")
    return total / count


def moe_layers_of(model: nn.Module) -> list[MoELayer]:
    if hasattr(model, "moe_layers"):
        return list(model.moe_layers())
    return [mod for mod in model.modules() if isinstance(mod, MoELayer)]


def knockout_losses(model: nn.Module, batches: Sequence, *, counts: Sequence[Tensor] | None = None,
                    top_n: int | None = None, method: str = "auto") -> dict:
    """Loss with each routed expert disabled, one at a time (or only the `top_n` most used of each
    layer by `counts`, tokens per expert per MoE layer), and with each layer's shared expert off.

    Returns {"method", "base_loss", "top_n", "experts": per MoE layer a list of {"expert", "tokens",
    "loss", "delta"} (delta = loss - base_loss), "shared": per MoE layer {"loss", "delta"} or None}.
    """
    layers = moe_layers_of(model)
    if counts is not None and len(counts) != len(layers):
        raise ValueError(f"counts has {len(counts)} layers; the model has {len(layers)} MoE layers")
    base = eval_loss(model, batches)
    experts_out, shared_out, methods = [], [], []
    for i, layer in enumerate(layers):
        E = layer.config.num_experts
        c_E = counts[i] if counts is not None else torch.zeros(E, dtype=torch.long)
        order = torch.argsort(c_E, descending=True, stable=True).tolist()
        chosen = order if top_n is None else order[:top_n]
        methods.append(resolve_method(layer, method))
        rows = []
        for e in sorted(chosen):
            with experts_disabled(layer, [e], method=method):
                loss = eval_loss(model, batches)
            rows.append({"expert": e, "tokens": int(c_E[e]), "loss": loss, "delta": loss - base})
        experts_out.append(rows)
        if layer.shared_experts is not None:
            with shared_disabled(layer):
                loss = eval_loss(model, batches)
            shared_out.append({"loss": loss, "delta": loss - base})
        else:
            shared_out.append(None)
    return {"method": methods, "base_loss": base, "top_n": top_n, "experts": experts_out, "shared": shared_out}
