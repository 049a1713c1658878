"""Global-batch balance loss over two gloo ranks: f is the whole batch's, P stays local."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, probs_TE: torch.Tensor, selected_TK: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        half = probs_TE.shape[0] // 2
        mine = slice(rank * half, (rank + 1) * half)
        loss = losses.load_balance_loss(probs_TE=probs_TE[mine], selected_TK=selected_TK[mine],
                                        granularity="global")
        out[rank] = float(loss)
    finally:
        dist.destroy_process_group()


def test_global_granularity_uses_the_whole_batch_counts() -> None:
    E, T = 4, 8
    g = torch.Generator().manual_seed(0)
    probs_TE = torch.rand(T, E, generator=g).softmax(-1)
    # Rank 0 sends everything to expert 0, rank 1 spreads: globally less skewed than rank 0 alone.
    selected_TK = torch.tensor([[0]] * 4 + [[0], [1], [2], [3]])
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), probs_TE, selected_TK, out), nprocs=2, join=True)
    f_E = torch.bincount(selected_TK.flatten(), minlength=E).float() / T
    for rank in range(2):
        p_E = probs_TE[rank * 4:(rank + 1) * 4].mean(0)
        expected = float(E * (f_E * p_E).sum())
        assert abs(out[rank] - expected) < 1e-6
    local0 = float(losses.load_balance_loss(probs_TE=probs_TE[:4], selected_TK=selected_TK[:4]))
    assert abs(out[0] - local0) > 1e-3  # the global loss is not the micro-batch one
