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
        slot_index_R: long or None. Source (token, slot) of each routed row, as t * K + k (the sort
            dispatcher sets it; layers whose rows live per slot, like mixture of attention, use it).
    """

    token_index_R: Tensor
    weights_R: Tensor
    num_tokens: int
    slot_index_R: Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MoEOutput:
    """Result of an MoE layer: `y` has the input's shape; aux losses are returned by name."""

    y: Tensor
    aux_losses: dict[str, Tensor]
    decision: RoutingDecision


@dataclass(frozen=True)
class LayerOutput:
    """Result of one decoder block.

    Attributes:
        x: the block's output (B, S, D).
        decision: the feed-forward MoE's routing, or None for a dense feed-forward.
        attention_decision: the mixture-of-attention's routing, or None.
        aux_losses: unweighted aux losses by name (mixture-of-attention ones prefixed "moa/").
        aux_loss: their sum weighted by each layer's coefficients, or None when there are none.
        kv: the attention's keys and values (for cross-layer sharing), or None.
    """

    x: Tensor
    decision: RoutingDecision | None = None
    attention_decision: RoutingDecision | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None
    kv: tuple[Tensor, Tensor] | None = None


@dataclass(frozen=True)
class ModelOutput:
    """Result of a model forward.

    Attributes:
        logits: (B, S, V). loss: the LM loss, or None without targets.
        aux_loss: the aux losses weighted by their coefficients and summed (None without routing).
        routing: one feed-forward RoutingDecision per layer (None for dense layers).
        cache: the KV cache, when one was passed.
        aux_losses: the unweighted aux losses by name, summed over layers (as computed in the
            forward, with its padding mask); mixture-of-attention ones are prefixed "moa/".
        attention_routing: one mixture-of-attention RoutingDecision per layer (None for layers
            without it; models other than MoETransformer may leave the list empty).
    """

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor | None
    routing: list[RoutingDecision | None]
    cache: object | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    attention_routing: list[RoutingDecision | None] = field(default_factory=list)
