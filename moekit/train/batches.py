"""Token streams packed into fixed-length sequences, and a batch order that is a pure function.

Documents are encoded, joined with `<|endoftext|>` and cut into windows of S+1 tokens (inputs and
next-token targets overlap by one). Batch `step` holds the sequences at positions
[step*B, (step+1)*B) of an endless stream of epochs, each epoch a permutation seeded by
(seed, epoch): a run resumed at any step sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from moekit.train.data import Document
from moekit.train.tokenizer import eos_id


def encode_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> Tensor:
    """All documents' token ids, each followed by `<|endoftext|>`, as one int32 stream (N,)."""
    eos = eos_id(tokenizer)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


@dataclass(frozen=True)
class PackedSequences:
    """A token stream viewed as `num_sequences` windows of `seq_len + 1` tokens."""

    tokens_N: Tensor
    seq_len: int

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len} is invalid: must be >= 1")
        if self.num_sequences < 1:
            raise ValueError(
                f"the corpus has {self.tokens_N.numel()} tokens, fewer than one sequence of "
                f"seq_len+1={self.seq_len + 1}; use a larger corpus or a smaller --seq-len")

    @property
    def num_sequences(self) -> int:
        return (self.tokens_N.numel() - 1) // self.seq_len

    def batch(self, indices_B: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs_BS, targets_BS), long, for the sequences at `indices_B`."""
        S = self.seq_len
        offsets_BS1 = indices_B[:, None] * S + torch.arange(S + 1)[None, :]
        window_BS1 = self.tokens_N[offsets_BS1].long()
        return window_BS1[:, :-1], window_BS1[:, 1:]


def batch_indices(step: int, *, seed: int, batch_size: int, num_sequences: int) -> Tensor:
    """Sequence indices (B,) of batch `step`: a pure function of (seed, step).

    Position p = step*B + b lies in epoch p // N at slot p % N of that epoch's permutation.
    """
    positions_B = step * batch_size + torch.arange(batch_size)
    epochs_B = positions_B // num_sequences
    out_B = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs_B.unique().tolist():
        # A generator of its own per epoch: no global RNG is read or advanced.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm_N = torch.randperm(num_sequences, generator=gen)
        sel_B = epochs_B == epoch
        out_B[sel_B] = perm_N[positions_B[sel_B] % num_sequences]
    return out_B


def eval_indices(num_sequences: int, max_sequences: int) -> Tensor:
    """The fixed validation sequences (M,): all of them when `max_sequences` is 0 or at least
    `num_sequences`, else `max_sequences` evenly spaced over the whole held-out stream (so a
    sample covers every held-out document, not only the first one), in order."""
    if max_sequences <= 0 or max_sequences >= num_sequences:
        return torch.arange(num_sequences)
    return torch.linspace(0, num_sequences - 1, max_sequences).round().long().unique()
