"""The vocabulary of checkpoint key-mapping rules: rename, stack experts, split a fused tensor.

A rule pairs checkpoint key patterns (`hf`) with moekit parameter patterns (`model`); `{layer}` and
`{expert}` are placeholders for integers. Each rule turns checkpoint tensors into model tensors
(`to_model`) and back (`to_hf`) with exact operations only (transpose, stack, cat, slice), so a round
trip is bit for bit. Hugging Face `nn.Linear` weights are (out, in); moekit's expert weights are
(E, in, out), hence the transposes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

Shapes = Mapping[str, tuple[int, ...]]  # model key -> shape of the model tensor it fills


def compile_pattern(pattern: str) -> re.Pattern:
    """Regex for a key pattern: `{layer}` and `{expert}` match integers, all else literally."""
    regex = re.escape(pattern)
    for name in ("layer", "expert"):
        regex = regex.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)", 1)
    return re.compile(regex)


def fill(pattern: str, **values: int) -> str:
    return pattern.format(**{k: v for k, v in values.items() if "{" + k + "}" in pattern})


def _swap(t: Tensor, transpose: bool) -> Tensor:
    """Swap the last two dims: (.., out, in) <-> (.., in, out)."""
    return t.transpose(-1, -2).contiguous() if transpose else t


@dataclass(frozen=True)
class Rename:
    """One checkpoint tensor <-> one model tensor, optionally with its last two dims swapped.

    Patterns may hold `{layer}`; keys that no rule matches map to themselves.
    """

    hf: str
    model: str
    transpose: bool = False

    @property
    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf,)

    @property
    def model_patterns(self) -> tuple[str, ...]:
        return (self.model,)

    def to_model(self, get, shapes: Shapes, layer: int | None) -> dict[str, Tensor]:
        return {fill(self.model, layer=layer): _swap(get(fill(self.hf, layer=layer)), self.transpose)}

    def to_hf(self, get, layer: int | None) -> dict[str, Tensor]:
        return {fill(self.hf, layer=layer): _swap(get(fill(self.model, layer=layer)), self.transpose)}


@dataclass(frozen=True)
class StackExperts:
    """E per-expert checkpoint tensors (`hf` holds `{expert}`) <-> one (E, ...) model tensor.

    With `transpose`, each (out, in) Linear weight becomes an (in, out) slice, e.g. Mixtral's
    `experts.{expert}.w1.weight` (F, D) -> `w_gate_EDF[expert]` (D, F).
    """

    hf: str
    model: str
    transpose: bool = True

    def __post_init__(self) -> None:
        if "{expert}" not in self.hf:
            raise ValueError(f"StackExperts hf={self.hf!r} must contain '{{expert}}'")

    @property
    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf,)

    @property
    def model_patterns(self) -> tuple[str, ...]:
        return (self.model,)

    def to_model(self, get, shapes: Shapes, layer: int | None) -> dict[str, Tensor]:
        num_experts = shapes[fill(self.model, layer=layer)][0]
        # Filled expert by expert (not torch.stack of a list) so only one expert's tensor is
        # held besides the result: loading stays near one copy of the weights.
        out = None
        for e in range(num_experts):
            key = fill(self.hf, layer=layer, expert=e)
            part = get(key)
            part = part.transpose(-1, -2) if self.transpose else part
            if out is None:
                out = part.new_empty((num_experts, *part.shape))
            elif part.shape != out.shape[1:]:
                raise ValueError(f"{key}: expert {e} has shape {tuple(get(key).shape)}, unlike expert 0's; "
                                 f"the checkpoint is inconsistent")
            out[e].copy_(part)
        assert out is not None, "StackExperts needs num_experts >= 1"
        return {fill(self.model, layer=layer): out}

    def to_hf(self, get, layer: int | None) -> dict[str, Tensor]:
        w_E = get(fill(self.model, layer=layer))
        return {fill(self.hf, layer=layer, expert=e): _swap(w_E[e], self.transpose).contiguous()
                for e in range(w_E.shape[0])}


@dataclass(frozen=True)
class Fused:
    """One checkpoint tensor <-> several model tensors that are its pieces along `dim`.

    Args:
        hf: the fused checkpoint key pattern.
        model: the pieces' model key patterns, in the order they sit in the fused tensor.
        dim: the checkpoint dim the pieces are concatenated along; each piece's extent comes from
            its model tensor's shape (so DBRX's Wqkv splits into q, k, v of different widths).
        interleaved: pieces alternate element by element along `dim` (gpt-oss gate_up:
            gate = [..., 0::2], up = [..., 1::2]) instead of sitting in blocks.
        transpose: swap each piece's last two dims (checkpoint (E, out, in) -> moekit (E, in, out)).
    """

    hf: str
    model: tuple[str, ...]
    dim: int
    interleaved: bool = False
    transpose: bool = False

    @property
    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf,)

    @property
    def model_patterns(self) -> tuple[str, ...]:
        return self.model

    def to_model(self, get, shapes: Shapes, layer: int | None) -> dict[str, Tensor]:
        key = fill(self.hf, layer=layer)
        fused = get(key)
        n = len(self.model)
        if self.interleaved:
            index = [torch.arange(i, fused.shape[self.dim], n) for i in range(n)]
            pieces = [fused.index_select(self.dim, idx) for idx in index]
        else:
            sizes = []
            for m in self.model:
                shape = list(shapes[fill(m, layer=layer)])
                if self.transpose:
                    shape[-2], shape[-1] = shape[-1], shape[-2]
                sizes.append(shape[self.dim])
            if sum(sizes) != fused.shape[self.dim]:
                raise ValueError(f"{key}: dim {self.dim} has size {fused.shape[self.dim]}, expected "
                                 f"{sum(sizes)} = {' + '.join(map(str, sizes))} from the model's shapes; "
                                 f"config.json contradicts the weights")
            pieces = list(torch.split(fused, sizes, dim=self.dim))
        return {fill(m, layer=layer): _swap(p, self.transpose).contiguous()
                for m, p in zip(self.model, pieces)}

    def to_hf(self, get, layer: int | None) -> dict[str, Tensor]:
        pieces = [_swap(get(fill(m, layer=layer)), self.transpose) for m in self.model]
        if self.interleaved:
            # stack a new axis right after `dim`, then merge the two: p0[0], p1[0], p0[1], p1[1], ...
            d = self.dim if self.dim >= 0 else pieces[0].dim() + self.dim
            fused = torch.stack(pieces, dim=d + 1).flatten(d, d + 1)
        else:
            fused = torch.cat(pieces, dim=self.dim)
        return {fill(self.hf, layer=layer): fused.contiguous()}


@dataclass(frozen=True)
class Unflatten(Rename):
    """A checkpoint tensor (E * F, D) of experts stacked along rows <-> a model tensor (E, ...).

    DBRX stores `experts.mlp.w1` as (E * F, D); with `transpose` it becomes w_gate_EDF (E, D, F),
    without (w2, already (F, D) per expert) w_down_EFD (E, F, D). Same fields and patterns as
    `Rename`; only the tensor's shape changes on the way.
    """

    def to_model(self, get, shapes: Shapes, layer: int | None) -> dict[str, Tensor]:
        key = fill(self.hf, layer=layer)
        flat = get(key)
        E = shapes[fill(self.model, layer=layer)][0]
        if flat.dim() != 2 or flat.shape[0] % E:
            raise ValueError(f"{key}: shape {tuple(flat.shape)} is not (num_experts * F, D) for "
                             f"num_experts={E}; config.json contradicts the weights")
        return {fill(self.model, layer=layer): _swap(flat.view(E, -1, flat.shape[-1]), self.transpose)}

    def to_hf(self, get, layer: int | None) -> dict[str, Tensor]:
        w = _swap(get(fill(self.model, layer=layer)), self.transpose)
        return {fill(self.hf, layer=layer): w.reshape(-1, w.shape[-1]).contiguous()}


Rule = Rename | StackExperts | Fused | Unflatten


@dataclass(frozen=True)
class Matcher:
    """Finds which rule (and which layer / expert) a key belongs to, on either side."""

    rules: tuple[Rule, ...]

    @cached_property
    def _hf(self) -> list[tuple[re.Pattern, Rule]]:
        return [(compile_pattern(p), r) for r in self.rules for p in r.hf_patterns]

    @cached_property
    def _model(self) -> list[tuple[re.Pattern, Rule]]:
        return [(compile_pattern(p), r) for r in self.rules for p in r.model_patterns]

    @staticmethod
    def _find(table, key: str) -> tuple[Rule, int | None, int | None] | None:
        for regex, rule in table:
            match = regex.fullmatch(key)
            if match is not None:
                groups = match.groupdict()
                layer = int(groups["layer"]) if groups.get("layer") is not None else None
                expert = int(groups["expert"]) if groups.get("expert") is not None else None
                return rule, layer, expert
        return None

    def match_hf(self, key: str) -> tuple[Rule, int | None, int | None] | None:
        return self._find(self._hf, key)

    def match_model(self, key: str) -> tuple[Rule, int | None, int | None] | None:
        return self._find(self._model, key)
