"""The one conversion engine: apply a family's rules checkpoint -> model and model -> checkpoint.

Keys no rule matches map to themselves. Loading raises on any checkpoint key that ends up naming no
model tensor and on any model tensor left unfilled; shapes are checked against the model and a
mismatch names the checkpoint key and its file. Tensors are produced one rule group at a time, so a
caller can copy each into the model and drop it before the next is read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from torch import Tensor

from moekit.hf.rules import Matcher, Rule, StackExperts, fill


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def get(self, key: str) -> Tensor: ...


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def checkpoint_to_model(
    rules: tuple[Rule, ...],
    source: TensorSource,
    model_shapes: Mapping[str, tuple[int, ...]],
    *,
    where: Callable[[str], str] = lambda key: key,
    name: str = "checkpoint",
) -> Iterator[tuple[str, Tensor]]:
    """Yield (model key, tensor) for every model tensor, converted from the checkpoint.

    Args:
        rules: the family's rules (both expert layouts may be present; each key matches one).
        source: the checkpoint (`keys()`, `get(key)`), e.g. a lazy `CheckpointReader`.
        model_shapes: every model tensor that must be filled, with its shape.
        where: describes a checkpoint key for error messages (e.g. "key in file").
        name: names the rule set in error messages (the model_type).
    Raises:
        ValueError: a checkpoint key maps to no model tensor, experts are missing, a shape does not
            fit, or a model tensor is left unfilled.
    """
    matcher = Matcher(rules)
    groups: dict[tuple[Rule, int | None], set[int | None]] = defaultdict(set)
    direct: list[str] = []
    for key in source.keys():
        found = matcher.match_hf(key)
        if found is None:
            direct.append(key)
        else:
            rule, layer, expert = found
            groups[(rule, layer)].add(expert)

    unmapped = [k for k in direct if k not in model_shapes]
    for rule, layer in groups:
        for target in rule.model_patterns:
            if fill(target, layer=layer) not in model_shapes:
                unmapped.append(fill(rule.hf_patterns[0], layer=layer, expert=0))
    if unmapped:
        raise ValueError(f"{name}: checkpoint tensor(s) that map to no model parameter: "
                         f"{_listing(where(k) for k in unmapped)}. The checkpoint does not fit this "
                         f"model_type's rules, or config.json contradicts the weights")

    filled: set[str] = set()
    for key in direct:
        yield _checked(key, source.get(key), model_shapes, where(key))
        filled.add(key)
    for (rule, layer), experts in groups.items():
        if isinstance(rule, StackExperts):
            _check_experts(rule, layer, experts, model_shapes[fill(rule.model, layer=layer)][0], where)
        for model_key, tensor in rule.to_model(source.get, model_shapes, layer).items():
            origin = where(fill(rule.hf, layer=layer, expert=0) if isinstance(rule, StackExperts)
                           else fill(rule.hf_patterns[0], layer=layer))
            yield _checked(model_key, tensor, model_shapes, origin)
            if model_key in filled:
                raise ValueError(f"{name}: model tensor {model_key!r} is filled twice (from {origin}); "
                                 f"the checkpoint holds it in two layouts")
            filled.add(model_key)
    missing = set(model_shapes) - filled
    if missing:
        raise ValueError(f"{name}: model parameter(s) not found in the checkpoint: "
                         f"{_listing(missing)}. The checkpoint is incomplete (a missing shard?) or "
                         f"config.json contradicts the weights")


def _checked(model_key: str, tensor: Tensor, shapes: Mapping[str, tuple[int, ...]],
             origin: str) -> tuple[str, Tensor]:
    want = tuple(shapes[model_key])
    if tuple(tensor.shape) != want:
        raise ValueError(f"{origin}: shape {tuple(tensor.shape)} does not fit model parameter "
                         f"{model_key!r} of shape {want}; config.json contradicts the weights")
    return model_key, tensor


def _check_experts(rule: StackExperts, layer: int | None, experts: set, num_experts: int,
                   where: Callable[[str], str]) -> None:
    want = set(range(num_experts))
    extra, absent = sorted(experts - want), sorted(want - experts)
    if extra:
        key = fill(rule.hf, layer=layer, expert=extra[0])
        raise ValueError(f"{where(key)}: expert {extra[0]} is beyond the config's {num_experts} "
                         f"experts; config.json contradicts the weights")
    if absent:
        key = fill(rule.hf, layer=layer, expert=absent[0])
        raise ValueError(f"checkpoint is missing {key!r} (expert {absent[0]} of {num_experts}); "
                         f"a shard or tensor is missing")


def model_to_checkpoint(rules: tuple[Rule, ...], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint tensors from model tensors: the rules applied backwards (keys matching none keep
    their name). `rules` should hold one expert layout only, the one to write."""
    matcher = Matcher(rules)
    out: dict[str, Tensor] = {}
    done: set[tuple[Rule, int | None]] = set()
    for key in state:
        found = matcher.match_model(key)
        if found is None:
            out[key] = state[key]
            continue
        rule, layer, _ = found
        if (rule, layer) in done:
            continue
        done.add((rule, layer))
        for piece in rule.model_patterns:
            if fill(piece, layer=layer) not in state:
                raise ValueError(f"model tensor {fill(piece, layer=layer)!r} is missing; rule for "
                                 f"{rule.hf_patterns[0]!r} needs it")
        out.update(rule.to_hf(state.__getitem__, layer))
    return out
