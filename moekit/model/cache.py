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


class SlotStore:
    """Preallocated per-slot cache buffers for batched decoding of independent sequences.

    Each of `n_slots` sequences owns one row of every buffer, `max_len` positions long: a token at
    position p of the sequence in slot s is written at [s, ..., p, ...]. Buffers are allocated on
    first use (zeros, so positions not yet written hold finite values the causal mask hides), and
    Mamba states are kept per slot and zeroed by `reset`. `view(slots_B, start_B)` gives the cache a
    forward over those slots uses.
    """

    def __init__(self, n_layers: int, n_slots: int, max_len: int) -> None:
        self.n_layers, self.n_slots, self.max_len = n_layers, n_slots, max_len
        self.buffers: dict[tuple[int, int], Tensor] = {}
        self.mamba: dict[int, tuple[Tensor, Tensor]] = {}

    def buffer(self, layer: int, index: int, like_BT: Tensor, dim: int) -> Tensor:
        key = (layer, index)
        if key not in self.buffers:
            shape = list(like_BT.shape)
            shape[0], shape[dim] = self.n_slots, self.max_len
            self.buffers[key] = torch.zeros(shape, dtype=like_BT.dtype, device=like_BT.device)
        return self.buffers[key]

    def reset(self, slot: int) -> None:
        """Forget the sequence in `slot` (its Mamba states back to zero; keys are overwritten)."""
        for conv_NIW, ssm_NIN in self.mamba.values():
            conv_NIW[slot].zero_()
            ssm_NIN[slot].zero_()

    def view(self, slots_B: Tensor, start_B: Tensor) -> "RowCache":
        """The cache for one forward whose row b continues the sequence in slot slots_B[b] at
        position start_B[b] (both long (B,))."""
        from moekit.model.mamba import MambaCache  # local import: mamba imports nothing from here

        layers: list = [None] * self.n_layers
        for layer, (conv_NIW, ssm_NIN) in self.mamba.items():
            layers[layer] = MambaCache(conv_state_BIW=conv_NIW[slots_B], ssm_state_BIN=ssm_NIN[slots_B])
        B, first = slots_B.shape[0], int(slots_B[0])
        contiguous = bool(torch.equal(slots_B, torch.arange(first, first + B, device=slots_B.device)))
        return RowCache(layers=layers, store=self, slots_B=slots_B, start_B=start_B,
                        first_slot=first if contiguous else None)


@dataclass
class RowCache(KVCache):
    """A `SlotStore` seen by one forward: per-row slots and start positions (see `SlotStore.view`).

    `append` writes the new positions of each row into its slot and returns every row's keys from
    position 0 to the batch's furthest position (rows that are behind see the extra ones masked
    out by causality). After the forward, `commit` writes the Mamba states back to the store.
    """

    store: SlotStore | None = None
    slots_B: Tensor | None = None
    start_B: Tensor | None = None
    first_slot: int | None = None  # set when slots_B is first, first + 1, ...: slice buffers, no gather

    def query_positions(self, S: int) -> Tensor:
        """long (B, S): the position of each new token."""
        assert self.start_B is not None
        return self.start_B[:, None] + torch.arange(S, device=self.start_B.device)

    def append(
        self, layer: int, *tensors_BT: Tensor, dim: int, keep: int | None = None
    ) -> tuple[Tensor, ...]:
        assert self.store is not None and self.slots_B is not None and self.start_B is not None
        B, S = tensors_BT[0].shape[0], tensors_BT[0].shape[dim]
        slots, starts = self.slots_B.tolist(), self.start_B.tolist()
        T = max(starts) + S
        if T > self.store.max_len:
            raise ValueError(f"sequence reaches position {T}, beyond the cache's max_len "
                             f"{self.store.max_len}")
        out = []
        for index, t in enumerate(tensors_BT):
            buf = self.store.buffer(layer, index, t, dim)
            # row b, positions start_b.. -> buf[slot_b, ..., start_b:start_b + S, ...]: one slice copy per
            # row (profiled at decode sizes: ~2 us per slice copy, ~300 us per advanced-index write)
            for b, (slot, start) in enumerate(zip(slots, starts)):
                buf[slot].narrow(dim - 1, start, S).copy_(t[b])
            if self.first_slot is not None:
                out.append(buf.narrow(0, self.first_slot, B).narrow(dim, 0, T))
            else:
                out.append(buf[self.slots_B].narrow(dim, 0, T))
        return tuple(out)

    def commit(self) -> None:
        """Write the Mamba states the forward produced back into the store's slots."""
        from moekit.model.mamba import MambaCache

        assert self.store is not None and self.slots_B is not None
        for layer, state in enumerate(self.layers):
            if not isinstance(state, MambaCache):
                continue
            if layer not in self.store.mamba:
                n = self.store.n_slots
                self.store.mamba[layer] = (
                    state.conv_state_BIW.new_zeros((n, *state.conv_state_BIW.shape[1:])),
                    state.ssm_state_BIN.new_zeros((n, *state.ssm_state_BIN.shape[1:])))
            conv_NIW, ssm_NIN = self.store.mamba[layer]
            conv_NIW[self.slots_B] = state.conv_state_BIW
            ssm_NIN[self.slots_B] = state.ssm_state_BIN
