"""What every router shares: the forward contract, recording and replay of decisions.

A router maps tokens to experts and returns a `RoutingDecision`. It has no side effects in
`forward` beyond an optional recording: noise and jitter apply only in training mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.types import RoutingDecision


def gate_logits(gate: nn.Linear, x_TD: Tensor) -> Tensor:
    """Router logits of a linear gate, computed in fp32 whatever the activation dtype."""
    bias = None if gate.bias is None else gate.bias.float()
    return F.linear(x_TD.float(), gate.weight.float(), bias)


def counts_from_ids(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Tokens per expert, ignoring -1 ("no expert") slots. Returns long (E,)."""
    ids = expert_ids_TK.reshape(-1)
    ids = ids[ids >= 0]
    return torch.bincount(ids, minlength=num_experts)


class Router(nn.Module):
    """Base class: subclasses implement `route`; `forward` adds record and replay.

    Record: `router.recording = []` makes every forward append its decision (detached) to the list.
    Replay: `router.replay = [decision, ...]` makes the next forwards reuse those expert choices in
    order; the weights are recomputed from the current logits (so gradients reach the router), by
    `weights_for`.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.recording: list[RoutingDecision] | None = None
        self.replay: list[RoutingDecision] | None = None

    def route(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        raise NotImplementedError

    def weights_for(self, x_TD: Tensor, expert_ids_TK: Tensor) -> RoutingDecision:
        """Decision for given expert ids, weights from the current router; used by replay."""
        raise NotImplementedError(f"{type(self).__name__} does not support replay")

    def forward(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        if self.replay:
            recorded = self.replay.pop(0)
            if recorded.expert_ids_TK.shape[0] != x_TD.shape[0]:
                raise ValueError(
                    f"replayed decision covers {recorded.expert_ids_TK.shape[0]} tokens but the input "
                    f"has {x_TD.shape[0]}; replay decisions in the order and batch shapes they were recorded"
                )
            decision = self.weights_for(x_TD, recorded.expert_ids_TK.to(x_TD.device))
        else:
            decision = self.route(x_TD, token_ids_T=token_ids_T, mask_T=mask_T)
        if mask_T is not None:
            decision = mask_decision(decision, mask_T)
        if self.recording is not None:
            self.recording.append(detach_decision(decision))
        return decision


def mask_decision(d: RoutingDecision, mask_T: Tensor) -> RoutingDecision:
    """Send padded tokens (mask False) nowhere: expert id -1, weight 0, not counted."""
    keep_T1 = mask_T.reshape(-1, 1).bool()
    ids_TK = d.expert_ids_TK.masked_fill(~keep_T1, -1)
    return RoutingDecision(
        expert_ids_TK=ids_TK,
        weights_TK=d.weights_TK.masked_fill(~keep_T1, 0.0),
        logits_TE=d.logits_TE,
        probs_TE=d.probs_TE,
        counts_E=counts_from_ids(ids_TK, d.logits_TE.shape[-1]),
        dropped_TK=None if d.dropped_TK is None else d.dropped_TK & keep_T1,
        selected_TK=None if d.selected_TK is None else d.selected_TK.masked_fill(~keep_T1, -1),
    )


def detach_decision(d: RoutingDecision) -> RoutingDecision:
    def det(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach()

    return RoutingDecision(
        expert_ids_TK=d.expert_ids_TK.detach(),
        weights_TK=d.weights_TK.detach(),
        logits_TE=d.logits_TE.detach(),
        probs_TE=d.probs_TE.detach(),
        counts_E=d.counts_E.detach(),
        dropped_TK=det(d.dropped_TK),
        selected_TK=det(d.selected_TK),
    )


class LinearGateRouter(Router):
    """A router scoring experts with a linear gate `gate` (D -> E, bias per `router_bias`)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=config.router_bias)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in fp32."""
        return gate_logits(self.gate, x_TD)
