"""Soft MoE as its own encoder layer (Puigcerver et al. 2023): `SoftMoELayer(MoEConfig(router="soft"))`.

It shares MoELayer's construction (router, experts, shared/dense parts), input checks, load
counting and aux losses, but not its forward: slots mix the tokens of each sequence
(`routing/soft.py`), so it needs whole sequences, is never causal and cannot replay a decision.
"""

from __future__ import annotations

from torch import Tensor

from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.routing.soft import CAUSAL_ERROR, REPLAY_ERROR, SoftRouter, soft_moe_layer
from moekit.traits import ROUTER_TRAITS
from moekit.types import MoEOutput


class SoftMoELayer(MoELayer):
    """A Soft MoE feed-forward layer for encoders.

    Forward as MoELayer's: x (B, S, D) (each row a sequence) or (T, D) (one sequence), mask
    True for real tokens (padded tokens are not mixed in and get output 0). `causal=True` raises.
    """

    mixes_sequences = True

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        token_ids: Tensor | None = None,
        causal: bool = False,
    ) -> MoEOutput:
        if not isinstance(self.router, SoftRouter):
            raise ValueError(f"SoftMoELayer needs MoEConfig(router='soft'); got router={self.config.router!r}")
        if causal:
            raise ValueError(CAUSAL_ERROR)
        if self.router.replay:
            raise ValueError(REPLAY_ERROR)
        x_TD, mask_T, _, num_sequences = self.flat_inputs(x, mask, token_ids)
        y_TD, decision = soft_moe_layer(self.router, self.experts, x_TD.view(x.shape), mask_T)
        return self.finish(x, x_TD, y_TD, decision, mask_T, num_sequences)


def make_moe_layer(config: MoEConfig) -> MoELayer:
    """The layer for `config`: SoftMoELayer for a router that mixes sequences (soft), else MoELayer."""
    return SoftMoELayer(config) if ROUTER_TRAITS[config.router].causal == "sequence" else MoELayer(config)
