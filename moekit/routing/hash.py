"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

A fixed table maps each token id to its experts; nothing is learned. The table is a buffer, saved
with the model: "random" (drawn from a fixed seed, so one config always gives one table) or
"balanced" (round-robin until `fit_balanced` spreads token frequencies evenly over the experts).
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.routing.base import Router, counts_from_ids
from moekit.types import RoutingDecision

RANDOM_TABLE_SEED = 0


def random_table(vocab_size: int, num_experts: int, top_k: int, *, seed: int = RANDOM_TABLE_SEED) -> Tensor:
    """Long (V, K): column j is hash table j; a token's K experts are distinct.

    Drawn from a seeded CPU generator, so the table is the same on every machine and device. The K
    columns are drawn together (the first K of a random permutation per token) rather than
    independently, so a token never visits one expert twice.
    """
    gen = torch.Generator().manual_seed(seed)
    if top_k == 1:
        return torch.randint(0, num_experts, (vocab_size, 1), generator=gen)
    chunks = []
    for start in range(0, vocab_size, 8192):  # bounded memory for large vocabularies
        rows = min(8192, vocab_size - start)
        chunks.append(torch.rand(rows, num_experts, generator=gen).argsort(dim=1)[:, :top_k])
    return torch.cat(chunks)


def round_robin_table(vocab_size: int, num_experts: int, top_k: int) -> Tensor:
    """Long (V, K): token v goes to experts (v*K + j) mod E, j < K (distinct because K <= E)."""
    slots_VK = torch.arange(vocab_size)[:, None] * top_k + torch.arange(top_k)
    return slots_VK % num_experts


def balanced_table(token_counts_V: Tensor, num_experts: int, top_k: int) -> Tensor:
    """Long (V, K): greedy balanced assignment of token ids by frequency (Roller et al. sec. 3).

    Token ids in order of decreasing count (ties: lower id first) each take the K currently
    least-loaded experts (ties: lower expert id), whose loads then grow by the token's count.
    """
    counts = [int(c) for c in token_counts_V.tolist()]
    order = sorted(range(len(counts)), key=lambda v: -counts[v])  # sorted() is stable
    heap = [(0, e) for e in range(num_experts)]  # (load, expert): pops least load, then lower id
    table = [[0] * top_k for _ in counts]
    for v in order:
        picked = [heapq.heappop(heap) for _ in range(top_k)]
        table[v] = [e for _, e in picked]
        for load, e in picked:
            heapq.heappush(heap, (load + counts[v], e))
    return torch.tensor(table, dtype=torch.long).reshape(len(counts), top_k)


class HashRouter(Router):
    """Token id -> experts by table lookup; K tables give K experts with combine weight 1/K each.

    No learned gate: `logits_TE` are zeros and `probs_TE` uniform (so the balance loss and z-loss
    are constants without gradient). Needs `token_ids` in [0, hash_vocab_size).
    """

    table_VK: Tensor

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        assert config.hash_vocab_size is not None  # MoEConfig checks this for router="hash"
        V, E, K = config.hash_vocab_size, config.num_experts, config.top_k
        table_VK = random_table(V, E, K) if config.hash_table == "random" else round_robin_table(V, E, K)
        self.register_buffer("table_VK", table_VK)

    @torch.no_grad()
    def fit_balanced(self, token_counts_V: Tensor) -> None:
        """Refit the table so expert loads are even under these token frequencies (long or float (V,))."""
        cfg = self.config
        if cfg.hash_table != "balanced":
            raise ValueError(f"fit_balanced needs MoEConfig(hash_table='balanced'); this router was "
                             f"built with hash_table={cfg.hash_table!r}, whose table is fixed")
        if token_counts_V.dim() != 1 or token_counts_V.shape[0] != cfg.hash_vocab_size:
            raise ValueError(f"token_counts_V must have shape ({cfg.hash_vocab_size},) (hash_vocab_size); "
                             f"got {tuple(token_counts_V.shape)}")
        if bool((token_counts_V < 0).any()):
            raise ValueError("token_counts_V must be non-negative token frequencies")
        table_VK = balanced_table(token_counts_V.cpu(), cfg.num_experts, cfg.top_k)
        self.table_VK.copy_(table_VK)

    def check_token_ids(self, token_ids_T: Tensor | None, num_tokens: int, mask_T: Tensor | None) -> Tensor:
        """The token ids as long (T,), with padded positions set to 0; raises on bad input."""
        V = self.config.hash_vocab_size
        if token_ids_T is None:
            raise ValueError("router='hash' routes by token id: pass token_ids (same leading shape as x), "
                             "e.g. MoELayer(...)(x, token_ids=tokens)")
        if token_ids_T.dtype.is_floating_point or token_ids_T.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor; got dtype {token_ids_T.dtype}")
        ids_T = token_ids_T.reshape(-1).long()
        if ids_T.shape[0] != num_tokens:
            raise ValueError(f"token_ids has {ids_T.shape[0]} entries but x has {num_tokens} tokens")
        if mask_T is not None:
            ids_T = ids_T.masked_fill(~mask_T.reshape(-1).bool(), 0)  # padding may hold any id
        if ids_T.numel() and (int(ids_T.min()) < 0 or int(ids_T.max()) >= V):
            raise ValueError(f"token_ids must lie in [0, hash_vocab_size={V}); got values in "
                             f"[{int(ids_T.min())}, {int(ids_T.max())}]. Set hash_vocab_size to the "
                             f"tokenizer's vocabulary size, or mask the padding with mask=")
        return ids_T

    def route(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        ids_T = self.check_token_ids(token_ids_T, x_TD.shape[0], mask_T)
        return self.weights_for(x_TD, self.table_VK[ids_T.to(self.table_VK.device)])

    def weights_for(self, x_TD: Tensor, expert_ids_TK: Tensor) -> RoutingDecision:
        """Decision for given expert ids: weight 1/K on each slot that goes to an expert."""
        T, E, K = x_TD.shape[0], self.config.num_experts, self.config.top_k
        weights_TK = (expert_ids_TK >= 0).float() / K
        logits_TE = torch.zeros(T, E, device=x_TD.device)
        probs_TE = torch.full((T, E), 1.0 / E, device=x_TD.device)
        return RoutingDecision(expert_ids_TK, weights_TK, logits_TE, probs_TE,
                               counts_from_ids(expert_ids_TK, E))
