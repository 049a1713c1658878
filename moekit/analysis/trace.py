"""Routing traces: which experts every token used in every MoE layer, in one documented file format.

A trace is a flat table of N tokens (padding excluded) in the order they were routed. It is what the
analysis metrics read, and what expert-cache simulation replays. On disk it is ONE safetensors file
(tensors only, never pickle) whose header metadata holds:

    "format": "moekit.routing_trace", "version": "1",
    "layers": JSON list of the decoder-layer index of each traced MoE layer,
    "num_experts": JSON list of each traced layer's expert count,
    "label_names": JSON list of domain names (labels_N indexes it; [] when unlabelled)

and these tensors (l = position of the layer in "layers", not its decoder index):

    token_ids_N      int64  token id of each routed token
    sequence_N       int64  which sequence (or request) the token belongs to
    position_N       int64  position of the token in its sequence (0-based)
    step_N           int64  which model forward routed the token (tokens of one forward share each
                            MoE layer's call, the unit an expert cache serves); optional (absent = each
                            token routed alone, in trace order)
    labels_N         int64  domain label (index into label_names); optional
    layer{l}.expert_ids_NK  int64  experts that processed the token, -1 = no expert (an empty
                            expert-choice/balanced slot or a capacity drop); sorted by combine weight,
                            highest first, so column 0 is the token's "first expert"
    layer{l}.weights_NK     float32 combine weight of each slot (0 for -1 slots); optional
    layer{l}.selected_NK    int64  the router's choice before capacity dropping; optional (absent
                            = same as expert_ids_NK)
    layer{l}.entropy_N      float32 entropy (nats) of the router's distribution over experts; optional

Tokens of one sequence need not be contiguous (a decode trace interleaves requests): consecutive
means same sequence_N and position_N + 1. A trace recorded from `moekit generate --trace` or
`moekit serve --trace` (`moekit.inference.trace_recorder`) has step_N in increasing order: its
forwards in the order they ran, each forward's MoE layers in depth order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import Tensor

from moekit.files import atomic_write
from moekit.types import RoutingDecision

TRACE_FORMAT = "moekit.routing_trace"
TRACE_VERSION = "1"


@dataclass(frozen=True)
class LayerTrace:
    """One MoE layer's routing of the trace's N tokens (see the module docstring for the fields)."""

    layer: int
    num_experts: int
    expert_ids_NK: Tensor
    weights_NK: Tensor | None = None
    selected_NK: Tensor | None = None
    entropy_N: Tensor | None = None

    def __post_init__(self) -> None:
        if self.expert_ids_NK.dim() != 2:
            raise ValueError(f"layer {self.layer}: expert_ids_NK must be 2-D (tokens, slots); got "
                             f"shape {tuple(self.expert_ids_NK.shape)}")
        ids = self.expert_ids_NK
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_experts):
            raise ValueError(f"layer {self.layer}: expert ids must be in [-1, {self.num_experts - 1}]; "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        for name in ("weights_NK", "selected_NK"):
            t = getattr(self, name)
            if t is not None and t.shape != ids.shape:
                raise ValueError(f"layer {self.layer}: {name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(ids.shape)} like expert_ids_NK")
        if self.entropy_N is not None and self.entropy_N.shape != (ids.shape[0],):
            raise ValueError(f"layer {self.layer}: entropy_N has shape {tuple(self.entropy_N.shape)}, "
                             f"expected ({ids.shape[0]},)")

    @property
    def selection_NK(self) -> Tensor:
        return self.expert_ids_NK if self.selected_NK is None else self.selected_NK

    @property
    def dropped_NK(self) -> Tensor:
        """Slots the router chose but capacity dropped."""
        return (self.selection_NK >= 0) & (self.expert_ids_NK < 0)


@dataclass(frozen=True)
class RoutingTrace:
    """N routed tokens with their ids, sequence, position, optional domain label, and per-layer routing."""

    token_ids_N: Tensor
    sequence_N: Tensor
    position_N: Tensor
    layers: tuple[LayerTrace, ...]
    labels_N: Tensor | None = None
    label_names: tuple[str, ...] = ()
    step_N: Tensor | None = None

    def __post_init__(self) -> None:
        N = self.token_ids_N.shape[0]
        for name in ("sequence_N", "position_N", "labels_N", "step_N"):
            t = getattr(self, name)
            if t is not None and t.shape != (N,):
                raise ValueError(f"trace {name} has shape {tuple(t.shape)}, expected ({N},) like token_ids_N")
        for lt in self.layers:
            if lt.expert_ids_NK.shape[0] != N:
                raise ValueError(f"trace layer {lt.layer} covers {lt.expert_ids_NK.shape[0]} tokens, "
                                 f"the trace has {N}")
        if self.labels_N is not None and N and (
                int(self.labels_N.min()) < 0 or int(self.labels_N.max()) >= max(len(self.label_names), 1)):
            raise ValueError(f"trace labels_N must index label_names ({len(self.label_names)} names); got "
                             f"values in [{int(self.labels_N.min())}, {int(self.labels_N.max())}]")

    @property
    def num_tokens(self) -> int:
        return self.token_ids_N.shape[0]

    def save(self, path: str | Path) -> Path:
        """Write the trace as one safetensors file (see the module docstring), whole or not at all."""
        path = Path(path)
        tensors: dict[str, Tensor] = {"token_ids_N": self.token_ids_N, "sequence_N": self.sequence_N,
                                      "position_N": self.position_N}
        for name in ("labels_N", "step_N"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        for i, lt in enumerate(self.layers):
            for name in ("expert_ids_NK", "weights_NK", "selected_NK", "entropy_N"):
                t = getattr(lt, name)
                if t is not None:
                    tensors[f"layer{i}.{name}"] = t
        metadata = {"format": TRACE_FORMAT, "version": TRACE_VERSION,
                    "layers": json.dumps([lt.layer for lt in self.layers]),
                    "num_experts": json.dumps([lt.num_experts for lt in self.layers]),
                    "label_names": json.dumps(list(self.label_names))}
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        return atomic_write(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        """Read a trace written by `save`; a ValueError naming the file if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing trace {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for a malformed header
            raise ValueError(f"{path} is not a safetensors file ({err})") from err
        if meta.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path} is not a moekit routing trace (metadata format="
                             f"{meta.get('format')!r}, expected {TRACE_FORMAT!r})")
        if meta.get("version") != TRACE_VERSION:
            raise ValueError(f"{path}: routing trace version {meta.get('version')!r} is not supported "
                             f"(this moekit reads version {TRACE_VERSION})")
        try:
            layer_ids, experts = json.loads(meta["layers"]), json.loads(meta["num_experts"])
            names = tuple(json.loads(meta.get("label_names", "[]")))
            layers = tuple(LayerTrace(layer=int(layer), num_experts=int(e),
                                      **{n: tensors.get(f"layer{i}.{n}") for n in
                                         ("expert_ids_NK", "weights_NK", "selected_NK", "entropy_N")})
                           for i, (layer, e) in enumerate(zip(layer_ids, experts, strict=True)))
            return cls(token_ids_N=tensors["token_ids_N"], sequence_N=tensors["sequence_N"],
                       position_N=tensors["position_N"], layers=layers, labels_N=tensors.get("labels_N"),
                       label_names=names, step_N=tensors.get("step_N"))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: malformed routing trace ({type(err).__name__}: {err})") from err


def router_entropy_T(probs_TE: Tensor) -> Tensor:
    """Entropy (nats, fp32) of each token's router distribution, renormalised to sum to 1."""
    p_TE = probs_TE.detach().float()
    p_TE = p_TE / p_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return -(p_TE * p_TE.clamp_min(1e-20).log()).sum(-1)


def sort_slots_by_weight(expert_ids_TK: Tensor, weights_TK: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Reorder each token's slots: valid slots by combine weight (highest first, ties keep slot
    order), then the -1 slots. Returns the reordered ids, weights and each of `others`."""
    key_TK = torch.where(expert_ids_TK >= 0, weights_TK.float(), torch.tensor(float("-inf")))
    order_TK = torch.sort(key_TK, dim=-1, descending=True, stable=True).indices
    return tuple(t.gather(-1, order_TK) for t in (expert_ids_TK, weights_TK, *others))


def layer_trace_from_decision(decision: RoutingDecision, *, layer: int, keep_T: Tensor | None = None) -> LayerTrace:
    """A LayerTrace of the tokens `keep_T` (bool, T) of one decision; slots sorted by weight."""
    ids_TK = decision.expert_ids_TK.detach().long().cpu()
    weights_TK = decision.weights_TK.detach().float().cpu()
    selected_TK = None if decision.selected_TK is None else decision.selected_TK.detach().long().cpu()
    entropy_T = router_entropy_T(decision.probs_TE).cpu()
    if selected_TK is None:
        ids_TK, weights_TK = sort_slots_by_weight(ids_TK, weights_TK)
    else:
        ids_TK, weights_TK, selected_TK = sort_slots_by_weight(ids_TK, weights_TK, selected_TK)
    if keep_T is not None:
        keep_T = keep_T.reshape(-1).bool().cpu()
        ids_TK, weights_TK, entropy_T = ids_TK[keep_T], weights_TK[keep_T], entropy_T[keep_T]
        selected_TK = None if selected_TK is None else selected_TK[keep_T]
    return LayerTrace(layer=layer, num_experts=decision.num_experts, expert_ids_NK=ids_TK,
                      weights_NK=weights_TK, selected_NK=selected_TK, entropy_N=entropy_T)


def trace_from_routing(
    routing: list[RoutingDecision | None],
    tokens_BS: Tensor,
    *,
    mask_BS: Tensor | None = None,
    labels_B: Tensor | None = None,
    label_names: tuple[str, ...] = (),
    first_sequence: int = 0,
    sequence_B: Tensor | None = None,
    start_B: Tensor | None = None,
    step: int | None = None,
) -> RoutingTrace:
    """The trace of one model forward: `routing` is `ModelOutput.routing` (None for dense layers).

    Args:
        tokens_BS: the forward's input ids. mask_BS: bool, False for padding (left out of the trace).
        labels_B: long (B,) domain label of each sequence. first_sequence: sequence id of row 0.
        sequence_B: long (B,) sequence id of each row (instead of first_sequence + row).
        start_B: long (B,) position of each row's first token (a decode step continues a sequence).
        step: this forward's index (fills step_N); None leaves step_N out.
    """
    B, S = tokens_BS.shape
    keep_BS = torch.ones(B, S, dtype=torch.bool) if mask_BS is None else mask_BS.bool().cpu()
    keep_T = keep_BS.reshape(-1)
    seq_B = first_sequence + torch.arange(B) if sequence_B is None else sequence_B.long().cpu()
    start = torch.zeros(B, dtype=torch.long) if start_B is None else start_B.long().cpu()
    seq_BS = seq_B[:, None].expand(B, S)
    pos_BS = start[:, None] + torch.arange(S)[None, :]
    layers = tuple(layer_trace_from_decision(d, layer=i, keep_T=keep_T)
                   for i, d in enumerate(routing) if d is not None)
    labels_N = None if labels_B is None else labels_B.long().cpu()[:, None].expand(B, S).reshape(-1)[keep_T]
    return RoutingTrace(token_ids_N=tokens_BS.long().cpu().reshape(-1)[keep_T],
                        sequence_N=seq_BS.reshape(-1)[keep_T], position_N=pos_BS.reshape(-1)[keep_T],
                        layers=layers, labels_N=labels_N, label_names=tuple(label_names),
                        step_N=None if step is None else torch.full((int(keep_T.sum()),), step, dtype=torch.long))


def concat_traces(traces: list[RoutingTrace]) -> RoutingTrace:
    """Join traces of the same model (same layers and label names), in order."""
    if not traces:
        raise ValueError("concat_traces needs at least one trace")
    first = traces[0]
    for t in traces[1:]:
        if [(lt.layer, lt.num_experts) for lt in t.layers] != [(lt.layer, lt.num_experts) for lt in first.layers]:
            raise ValueError("traces come from models with different MoE layers; cannot join them")
        if t.label_names != first.label_names or (t.labels_N is None) != (first.labels_N is None):
            raise ValueError("traces have different label names; cannot join them")

    def cat(get) -> Tensor | None:
        parts = [get(t) for t in traces]
        return None if any(p is None for p in parts) else torch.cat(parts)

    layers = []
    for i, lt in enumerate(first.layers):
        fields = {n: cat(lambda t, n=n: getattr(t.layers[i], n))
                  for n in ("expert_ids_NK", "weights_NK", "entropy_N")}
        if any(t.layers[i].selected_NK is not None for t in traces):
            fields["selected_NK"] = torch.cat([t.layers[i].selection_NK for t in traces])
        layers.append(replace(lt, **fields))
    return RoutingTrace(token_ids_N=torch.cat([t.token_ids_N for t in traces]),
                        sequence_N=torch.cat([t.sequence_N for t in traces]),
                        position_N=torch.cat([t.position_N for t in traces]), layers=tuple(layers),
                        labels_N=cat(lambda t: t.labels_N), label_names=first.label_names,
                        step_N=cat(lambda t: t.step_N))
