"""Checks of what callers pass to layers and models, with errors that name the input and the fix.

Masks: True (or 1) marks a real token, False (or 0) padding. A bool mask is used as it is; an
integer mask holding only 0 and 1 (Hugging Face's attention_mask) is converted explicitly; any
other mask (floats, other integers) is refused, since treating 7 or 0.25 as "real" would change
capacity and loss weighting silently.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def bool_mask(mask: Tensor | None, name: str = "mask") -> Tensor | None:
    """`mask` as a bool tensor (True = real token); raises TypeError/ValueError for anything else."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be a bool tensor (True for real tokens) or an integer 0/1 tensor; "
                        f"got dtype {mask.dtype}. Pass {name}=({name} > 0) or a bool mask")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(f"{name} holds values other than 0 and 1 (e.g. {int(mask[bad][0])}); pass a bool "
                         f"mask, True for real tokens")
    return mask.bool()


def check_float_input(x: Tensor, weight: Tensor, name: str = "x") -> None:
    """Refuse a non-float input, or one whose dtype differs from the layer's weights outside autocast."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor; got dtype {x.dtype}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the layer's weights are {weight.dtype}; convert one "
                        f"to the other ({name}.to({weight.dtype}) or layer.to({x.dtype})), or run under "
                        "torch.autocast")


def check_token_range(ids: Tensor, vocab_size: int, name: str, *, ignore_index: int | None = None) -> None:
    """Refuse token ids outside [0, vocab_size) (ignore_index, e.g. -100 for targets, is allowed)."""
    if ids.numel() == 0:
        return
    ok = (ids >= 0) & (ids < vocab_size)
    if ignore_index is not None:
        ok |= ids == ignore_index
    if not bool(ok.all()):
        bad = int(ids[~ok][0])
        allowed = f"[0, {vocab_size})" + (f" or {ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{name} holds {bad}, outside the vocabulary: values must be in {allowed} "
                         f"(vocab_size={vocab_size}); check the tokenizer matches the model")
