"""What each router and activation is, in one torch-free table.

`ROUTER_TRAITS` is read by config validation (which options a router takes), `MoELayer.aux_losses`
(which losses apply), the decoder (which routers are causal), and `moekit demo` (which routers
exist). Adding a router is one file in `moekit/routing/` plus one row here and one line in
`moekit.routing.ROUTERS`; a test checks that the three agree with `MoEConfig.router`'s Literal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Gated (GLU) activations take a gate and an up projection (3 matrices); the others take one (2).
GATED_ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")
ACTIVATIONS = GATED_ACTIVATIONS + ("gelu", "relu", "silu")

Causality = Literal["token", "at_eval", "batch", "sequence"]


@dataclass(frozen=True)
class RouterTraits:
    """One router's facts.

    Attributes:
        summary: one line for the demo and the README.
        gate: "linear" (a D -> E linear gate, which may carry `router_bias`), "slots" (Soft MoE's
            Phi, no bias) or "none" (hash routing: nothing learned).
        token_choice: takes the token-choice options (noisy_gating, expert_bias,
            softmax_after_topk, group-limited routing).
        jitter: supports `jitter_eps` (multiplicative input jitter in training).
        score_funcs: the `score_func` values it supports.
        scales_weights: applies `routed_scaling_factor` to its combine weights.
        own_capacity: sets each expert's capacity itself (capacity_factor/expert_capacity refused).
        aux_losses: which of the layer's aux losses apply ("load_balance", "z").
        causal: how a token's routing depends on other tokens: "token" (on itself only),
            "at_eval" (training balances over the batch, eval routes each token alone: Sinkhorn),
            "batch" (always ranks over the batch: expert choice), "sequence" (mixes the tokens of
            a sequence: Soft MoE, never causal).
        replayable: a recorded decision can be replayed (`router.replay`).
        demo: the extra MoEConfig fields `moekit demo` needs to build it.
    """

    summary: str
    gate: Literal["linear", "slots", "none"]
    token_choice: bool
    jitter: bool
    score_funcs: tuple[str, ...]
    scales_weights: bool
    own_capacity: bool
    aux_losses: tuple[str, ...]
    causal: Causality
    replayable: bool
    demo: dict[str, Any] = field(default_factory=dict)


ROUTER_TRAITS: dict[str, RouterTraits] = {
    "topk": RouterTraits(
        summary="token choice: softmax or sigmoid top-k (Switch, Mixtral, DeepSeek, ...)",
        gate="linear", token_choice=True, jitter=True, score_funcs=("softmax", "sigmoid"),
        scales_weights=True, own_capacity=False, aux_losses=("load_balance", "z"), causal="token",
        replayable=True),
    "expert_choice": RouterTraits(
        summary="experts pick their top-C tokens (Zhou et al. 2022)",
        gate="linear", token_choice=False, jitter=False, score_funcs=("softmax",),
        scales_weights=False, own_capacity=True, aux_losses=("z",), causal="batch", replayable=True),
    "hash": RouterTraits(
        summary="fixed token-id -> expert table (Roller et al. 2021)",
        gate="none", token_choice=False, jitter=False, score_funcs=("softmax",),
        scales_weights=False, own_capacity=False, aux_losses=(), causal="token", replayable=True,
        demo={"hash_vocab_size": 1000}),
    "sinkhorn": RouterTraits(
        summary="balanced assignment by Sinkhorn iterations in training, top-k in eval (BASE)",
        gate="linear", token_choice=False, jitter=False, score_funcs=("softmax", "sigmoid"),
        scales_weights=True, own_capacity=False, aux_losses=("load_balance", "z"), causal="at_eval",
        replayable=True),
    "soft": RouterTraits(
        summary="Soft MoE slots mixing a sequence's tokens (Puigcerver et al. 2023), encoders only",
        gate="slots", token_choice=False, jitter=False, score_funcs=("softmax",),
        scales_weights=False, own_capacity=True, aux_losses=("z",), causal="sequence", replayable=False),
    "sparsemixer": RouterTraits(
        summary="PhiMoE's sparsemixer: per-slot softmax over near-best experts (Liu et al. 2024)",
        gate="linear", token_choice=False, jitter=True, score_funcs=("softmax",),
        scales_weights=False, own_capacity=False, aux_losses=("load_balance", "z"), causal="token",
        replayable=True),
}

ROUTER_NAMES = tuple(ROUTER_TRAITS)
CAUSAL_ROUTERS = tuple(n for n, t in ROUTER_TRAITS.items() if t.causal in ("token", "at_eval"))


def decoder_router_error(router: str) -> str | None:
    """Why `router` cannot route a decoder's feed-forward, or None when it can."""
    if ROUTER_TRAITS[router].causal != "sequence":
        return None
    return (f"router={router!r} mixes every token of a sequence into each expert slot, so a token's output "
            f"would depend on later tokens; a decoder needs a causal router: one of {', '.join(CAUSAL_ROUTERS)} "
            f"(use router={router!r} in an encoder, e.g. moekit.model.encoder_decoder)")


def batch_ranked_warning(router: str) -> str:
    """The warning a decoder gives for a router whose routing ranks tokens over the whole batch."""
    return (f"router={router!r} in a decoder ranks tokens over the whole batch, so a token's routing "
            "depends on later tokens and on other sequences: usable to train and compare (as Zhou et al. "
            "2022 did), but not to generate, so a forward with a KV cache is refused")


def generation_error(router: str) -> str | None:
    """Why a decoder routed by `router` cannot generate (decode with a KV cache), or None."""
    if ROUTER_TRAITS[router].causal != "batch":
        return None
    return batch_ranked_warning(router) + "; choose a causal router to generate"
