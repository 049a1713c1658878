"""The decoding cache: per-layer keys and values (or MLA latents, or Mamba states) and the position.

Attention layers append along the sequence, so decoding token by token sees exactly the keys a
full forward would; sliding-window layers keep only the last window - 1 keys between calls (the
oldest key any later query can see), so their memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVCache:
    """State carried between forwards of one batch of sequences.

    Attributes:
        layers: per layer, the cached tensors: (k_BHTd, v_BHTd) for attention, (latent_BTc,
            k_rot_BTr) for latent attention, a `MambaCache` for Mamba; None until first use (and
            forever for layers that read another layer's K/V).
        key_mask_BT: bool, True for real (non-padding) tokens seen so far; None if no mask was given.
        position: tokens already processed (the position of the next token).
        batch_size: the number of sequences, fixed by the first forward (None before it).
    """

    layers: list = field(default_factory=list)
    key_mask_BT: Tensor | None = None
    position: int = 0
    batch_size: int | None = None

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls(layers=[None] * n_layers)

    def append(
        self, layer: int, *tensors_BT: Tensor, dim: int, keep: int | None = None
    ) -> tuple[Tensor, ...]:
        """Concatenate new tensors to layer `layer`'s cache along `dim`; return the full tensors.

        With `keep`, only the last `keep` positions are stored for the next call.
        """
        old = self.layers[layer]
        if old is None:
            full = tensors_BT
        else:
            full = tuple(torch.cat((o, t), dim=dim) for o, t in zip(old, tensors_BT))
        stored = full
        if keep is not None:
            stored = tuple(t.narrow(dim, max(0, t.shape[dim] - keep), min(keep, t.shape[dim])) for t in full)
        self.layers[layer] = tuple(t.detach() for t in stored)
        return full
