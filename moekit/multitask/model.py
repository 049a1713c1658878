"""Multi-task models of Ma et al. 2018 (MMoE) over tabular rows, and their baselines.

    row -> [embedding of each categorical column ; standardised numerics] = x_NI
    shared_bottom: one MLP bottom -> one tower per task
    one_gate (OMoE): E expert MLPs, ONE softmax gate over them -> the same mixture -> towers
    mmoe: E expert MLPs, one softmax gate PER TASK (dense, or top-k renormalised) -> towers
    single: one shared-bottom network per task, trained on its own loss only (`tasks=(t,)`)
Shape suffixes: N rows, I input features, H expert / bottom width, E experts, T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from moekit.config import check, check_choice

MODEL_KINDS = ("shared_bottom", "one_gate", "mmoe")


@dataclass(frozen=True, kw_only=True)
class MultiTaskConfig:
    """Args:
        kind: "shared_bottom", "one_gate" (OMoE) or "mmoe".
        cardinalities: vocabulary size of each categorical column; num_numeric: numeric columns.
        embed_dim: width of every categorical embedding.
        num_tasks: towers (and, for mmoe, gates).
        num_experts / expert_dim: experts and their output width (shared_bottom: bottom width
            num_experts * expert_dim when `match_params`, else expert_dim).
        gate_top_k: None for dense softmax gates, else keep each gate's top-k and renormalise.
        tower_dim: hidden width of each task tower.
    """

    kind: Literal["shared_bottom", "one_gate", "mmoe"] = "mmoe"
    cardinalities: tuple[int, ...] = ()
    num_numeric: int = 0
    embed_dim: int = 4
    num_tasks: int = 2
    num_experts: int = 8
    expert_dim: int = 16
    gate_top_k: int | None = None
    tower_dim: int = 8
    bottom_dim: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", MODEL_KINDS)
        for name in ("embed_dim", "num_tasks", "num_experts", "expert_dim", "tower_dim"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        check(all(isinstance(c, int) and c >= 1 for c in self.cardinalities), "cardinalities",
              self.cardinalities, "must be positive integers")
        check(self.input_dim >= 1, "num_numeric", self.num_numeric, "the model needs at least one input column")
        if self.gate_top_k is not None:
            check(1 <= self.gate_top_k <= self.num_experts, "gate_top_k", self.gate_top_k,
                  f"must be in [1, num_experts={self.num_experts}] or None")

    @property
    def input_dim(self) -> int:
        return len(self.cardinalities) * self.embed_dim + self.num_numeric

    @property
    def shared_dim(self) -> int:
        """Width of the shared-bottom MLP (default: the experts' summed width, as in the paper's
        baseline of comparable size)."""
        return self.bottom_dim if self.bottom_dim is not None else self.num_experts * self.expert_dim


class TabularInput(nn.Module):
    """Concatenates one embedding per categorical column with the numeric columns."""

    def __init__(self, cardinalities: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, embed_dim) for c in cardinalities)

    def forward(self, categorical_NC: Tensor, numeric_NF: Tensor) -> Tensor:
        if categorical_NC.shape[1] != len(self.embeddings):
            raise ValueError(f"rows have {categorical_NC.shape[1]} categorical columns; the model was "
                             f"built for {len(self.embeddings)}")
        parts = [emb(categorical_NC[:, j]) for j, emb in enumerate(self.embeddings)]
        return torch.cat(parts + [numeric_NF], dim=1)


def gate_weights(logits_NE: Tensor, top_k: int | None) -> Tensor:
    """Softmax over experts (fp32); with top_k, softmax over only each row's top-k logits (the other
    experts get weight 0; ties keep the lower expert id)."""
    logits_NE = logits_NE.float()
    if top_k is None or top_k >= logits_NE.shape[-1]:
        return logits_NE.softmax(-1)
    top_NK = torch.topk(logits_NE, top_k, dim=-1, sorted=False).indices
    keep_NE = torch.zeros_like(logits_NE, dtype=torch.bool).scatter_(1, top_NK, True)
    return logits_NE.masked_fill(~keep_NE, float("-inf")).softmax(-1)


class ExpertMLPs(nn.Module):
    """E one-layer ReLU experts I -> H, as 3-D weights: every expert runs on every row (dense MMoE)."""

    def __init__(self, num_experts: int, input_dim: int, expert_dim: int) -> None:
        super().__init__()
        self.w_EIH = nn.Parameter(torch.randn(num_experts, input_dim, expert_dim) / input_dim ** 0.5)
        self.b_EH = nn.Parameter(torch.zeros(num_experts, expert_dim))

    def forward(self, x_NI: Tensor) -> Tensor:
        return torch.relu(torch.einsum("ni,eih->neh", x_NI, self.w_EIH) + self.b_EH)  # (N, E, H)


def tower(in_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


@dataclass(frozen=True)
class MultiTaskOutput:
    """logits (N, T); gates: per task (N, E) gate weights (empty for shared_bottom)."""

    logits_NT: Tensor
    gates: list[Tensor]


class MultiTaskModel(nn.Module):
    """The shared-bottom, one-gate MoE and multi-gate MoE (MMoE) models of Ma et al. 2018."""

    def __init__(self, config: MultiTaskConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.input = TabularInput(c.cardinalities, c.embed_dim)
        if c.kind == "shared_bottom":
            self.bottom = nn.Sequential(nn.Linear(c.input_dim, c.shared_dim), nn.ReLU())
            head_dim = c.shared_dim
        else:
            self.experts = ExpertMLPs(c.num_experts, c.input_dim, c.expert_dim)
            num_gates = c.num_tasks if c.kind == "mmoe" else 1
            self.gates = nn.ModuleList(nn.Linear(c.input_dim, c.num_experts) for _ in range(num_gates))
            head_dim = c.expert_dim
        self.towers = nn.ModuleList(tower(head_dim, c.tower_dim) for _ in range(c.num_tasks))

    def forward(self, categorical_NC: Tensor, numeric_NF: Tensor) -> MultiTaskOutput:
        x_NI = self.input(categorical_NC, numeric_NF)
        if self.config.kind == "shared_bottom":
            h_NH = self.bottom(x_NI)
            return MultiTaskOutput(torch.cat([t(h_NH) for t in self.towers], dim=1), [])
        experts_NEH = self.experts(x_NI)
        gates = [gate_weights(g(x_NI), self.config.gate_top_k) for g in self.gates]
        mixed = [torch.einsum("ne,neh->nh", g_NE.to(experts_NEH.dtype), experts_NEH) for g_NE in gates]
        if len(mixed) == 1:  # one gate: every task reads the same mixture
            mixed = mixed * self.config.num_tasks
        logits_NT = torch.cat([t(h_NH) for t, h_NH in zip(self.towers, mixed)], dim=1)
        return MultiTaskOutput(logits_NT, gates)
