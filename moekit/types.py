"""Records passed between moekit's pieces, and the shape-suffix legend.

Shape suffixes name every tensor's dimensions:
    B batch, S sequence, T tokens (= B*S), D model dim, F expert ffn dim, E experts,
    e local experts, K top-k slots, R routed rows, C capacity, V vocab, H heads, L layers.
So `x_TD` is tokens x model dim and `w_up_EDF` is experts x model dim x ffn dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class RoutingDecision:
    """What a router decided for a flat batch of T tokens.

    Attributes:
        expert_ids_TK: long. The expert each token slot goes to; -1 means "no expert" (a slot that
            expert-choice or balanced routing left empty, or a slot dropped for capacity).
        weights_TK: float32. Final combine weights; 0 where the slot goes nowhere.
        logits_TE: float32. Raw router logits, kept for the z-loss and analysis.
        probs_TE: float32. The per-expert scores the load-balancing loss uses (softmax over experts,
            or the normalised sigmoid scores of DeepSeek-V3).
        counts_E: long. Tokens each expert receives after dropping.
        dropped_TK: bool or None. Slots the router selected but capacity dropped.
        selected_TK: long or None. Expert ids as selected, before dropping (for balance losses);
            None means the same as `expert_ids_TK`.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    counts_E: Tensor
    dropped_TK: Tensor | None = None
    selected_TK: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[-1]

    @property
    def selection_TK(self) -> Tensor:
        """Expert ids before any capacity drop (the router's choice)."""
        return self.expert_ids_TK if self.selected_TK is None else self.selected_TK


@dataclass(frozen=True)
class DispatchPlan:
    """Metadata a dispatcher hands from `dispatch` to `combine`; holds no weights.

    Attributes:
        token_index_R: long. Source token of each routed row (rows sorted by expert).
        weights_R: float32. Combine weight of each routed row.
        num_tokens: T, the number of output rows of `combine`.
    """

    token_index_R: Tensor
    weights_R: Tensor
    num_tokens: int
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MoEOutput:
    """Result of an MoE layer: `y` has the input's shape; aux losses are returned by name."""

    y: Tensor
    aux_losses: dict[str, Tensor]
    decision: RoutingDecision


@dataclass(frozen=True)
class ModelOutput:
    """Result of a model forward: logits (B, S, V), LM loss, the weighted aux-loss sum, routing."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor | None
    routing: list[RoutingDecision | None]
    cache: object | None = None
