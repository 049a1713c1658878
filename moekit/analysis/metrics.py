"""Specialization metrics over routing tables, each with its null baseline (pure functions).

Inputs are the columns of a routing trace (`moekit.analysis.trace`): `expert_ids_NK` (long, -1 = no
expert) and per-token `labels_N`, `token_ids_N`, `sequence_N`, `position_N`. Padding is never in a
trace; -1 slots are skipped everywhere. `k` below is the mean number of valid slots per token
(top_k for token-choice routing without drops). The metrics follow OLMoE (Muennighoff et al. 2024,
sec. 5: domain and vocabulary specialization, co-activation, saturation) and Mixtral (Jiang et al.
2024, sec. 5: consecutive tokens keeping their expert).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor


def valid_NK(expert_ids_NK: Tensor) -> Tensor:
    return expert_ids_NK >= 0


def mean_slots(expert_ids_NK: Tensor) -> float:
    """k: valid slots per token (0 for an empty table)."""
    N = expert_ids_NK.shape[0]
    return float(valid_NK(expert_ids_NK).sum()) / N if N else 0.0


def membership_NE(expert_ids_NK: Tensor, num_experts: int) -> Tensor:
    """bool (N, E): expert e is among token n's valid slots."""
    N = expert_ids_NK.shape[0]
    out_NE = torch.zeros(N, num_experts + 1, dtype=torch.bool)
    out_NE.scatter_(1, torch.where(expert_ids_NK >= 0, expert_ids_NK, num_experts), True)
    return out_NE[:, :num_experts]


def load_counts(expert_ids_NK: Tensor, num_experts: int) -> Tensor:
    """long (E,): slots each expert processed."""
    ids = expert_ids_NK[valid_NK(expert_ids_NK)]
    return torch.bincount(ids, minlength=num_experts)


def load_stats(expert_ids_NK: Tensor, num_experts: int, *, seed: int = 0) -> dict:
    """Load per expert, MaxVio (max load / mean load - 1, Wang et al. 2024) and its null baseline:
    the MaxVio of uniformly random top-k routing of the same number of tokens (fixed seed), which
    is above 0 by chance alone."""
    counts_E = load_counts(expert_ids_NK, num_experts)
    N, k = expert_ids_NK.shape[0], round(mean_slots(expert_ids_NK))
    mean = counts_E.float().mean()
    max_vio = float(counts_E.max() / mean - 1) if float(mean) > 0 else 0.0
    uniform = 0.0
    if N and k:
        gen = torch.Generator().manual_seed(seed)
        ids_NK = torch.rand(N, num_experts, generator=gen).topk(min(k, num_experts), dim=-1).indices
        c_E = load_counts(ids_NK, num_experts).float()
        uniform = float(c_E.max() / c_E.mean() - 1)
    total = int(counts_E.sum())
    return {"tokens_per_expert": counts_E.tolist(),
            "load_fraction": [c / total if total else 0.0 for c in counts_E.tolist()],
            "max_vio": max_vio, "max_vio_uniform": uniform}


def dropped_fraction(expert_ids_NK: Tensor, selected_NK: Tensor | None) -> float:
    """Dropped slots / slots the router chose (0 when nothing was dropped; the null baseline is 0)."""
    if selected_NK is None:
        return 0.0
    chosen = selected_NK >= 0
    dropped = chosen & (expert_ids_NK < 0)
    return float(dropped.sum()) / max(int(chosen.sum()), 1)


def entropy_stats(entropy_N: Tensor | None, num_experts: int) -> dict:
    """Mean router entropy (nats) and the same over log(E), the entropy of uniform routing."""
    if entropy_N is None or entropy_N.numel() == 0:
        return {"router_entropy": None, "router_entropy_normalized": None, "router_entropy_uniform": None}
    h = float(entropy_N.float().mean())
    log_e = math.log(num_experts) if num_experts > 1 else 0.0
    return {"router_entropy": h, "router_entropy_normalized": h / log_e if log_e else 0.0,
            "router_entropy_uniform": log_e}


# ---- domains -----------------------------------------------------------------------------------
def domain_counts(expert_ids_NK: Tensor, labels_N: Tensor, *, num_experts: int,
                  num_domains: int) -> tuple[Tensor, Tensor]:
    """(slots_GE, tokens_G): slots of domain g's tokens at expert e, and domain g's token count."""
    member_NE = membership_NE(expert_ids_NK, num_experts).float()
    onehot_NG = torch.nn.functional.one_hot(labels_N.long(), num_domains).float()
    return (onehot_NG.T @ member_NE).round().long(), torch.bincount(labels_N.long(), minlength=num_domains)


def domain_share(expert_ids_NK: Tensor, labels_N: Tensor, *, num_experts: int, num_domains: int) -> Tensor:
    """float (G, E): share of domain g's tokens that expert e processed (OLMoE's domain
    specialization). Rows sum to k; uniform routing gives k/E everywhere; a domain that always goes
    to expert e has share 1 there."""
    slots_GE, tokens_G = domain_counts(expert_ids_NK, labels_N, num_experts=num_experts, num_domains=num_domains)
    return slots_GE.float() / tokens_G.clamp_min(1)[:, None].float()


def shuffle_labels(labels_N: Tensor, sequence_N: Tensor | None, *, seed: int = 0) -> Tensor:
    """The shuffled-label control: sequences' labels permuted among sequences (token-level when a
    sequence holds several labels or no sequence ids are given). Keeps domain sizes roughly and all
    routing imbalance, removes any link between domain and routing."""
    gen = torch.Generator().manual_seed(seed)
    if sequence_N is not None and labels_N.numel():
        seq_ids, inverse = torch.unique(sequence_N, return_inverse=True)
        hi_Q = torch.full((len(seq_ids),), -1, dtype=torch.long).scatter_reduce(
            0, inverse, labels_N.long(), reduce="amax")
        lo_Q = torch.full((len(seq_ids),), 1 << 40, dtype=torch.long).scatter_reduce(
            0, inverse, labels_N.long(), reduce="amin")
        if torch.equal(hi_Q, lo_Q) and len(seq_ids) > 1:  # one label per sequence
            return hi_Q[torch.randperm(len(seq_ids), generator=gen)][inverse]
    return labels_N[torch.randperm(labels_N.numel(), generator=gen)]


def domain_specialization(expert_ids_NK: Tensor, labels_N: Tensor, *, num_experts: int, num_domains: int,
                          sequence_N: Tensor | None = None, seed: int = 0) -> dict:
    """Domain x expert shares and one summary per domain: its largest share (1 = all its tokens go
    to one expert). Baselines: k/E (uniform routing) and the same summary under shuffled labels."""
    share_GE = domain_share(expert_ids_NK, labels_N, num_experts=num_experts, num_domains=num_domains)
    _, tokens_G = domain_counts(expert_ids_NK, labels_N, num_experts=num_experts, num_domains=num_domains)
    shuffled_GE = domain_share(expert_ids_NK, shuffle_labels(labels_N, sequence_N, seed=seed),
                               num_experts=num_experts, num_domains=num_domains)
    present_G = tokens_G > 0
    max_G, shuffled_max_G = share_GE.max(-1).values, shuffled_GE.max(-1).values
    return {
        "share": share_GE.tolist(),
        "tokens_per_domain": tokens_G.tolist(),
        "max_share": max_G.tolist(),
        "mean_max_share": float(max_G[present_G].mean()) if present_G.any() else 0.0,
        "mean_max_share_shuffled": float(shuffled_max_G[present_G].mean()) if present_G.any() else 0.0,
        "uniform": mean_slots(expert_ids_NK) / num_experts,
    }


# ---- vocabulary --------------------------------------------------------------------------------
def token_expert_counts(expert_ids_NK: Tensor, token_ids_N: Tensor, *,
                        num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(vocab_U, counts_UE, occurrences_U) over the U distinct token ids: how often each id's
    occurrences were processed by each expert."""
    vocab_U, inverse_N = torch.unique(token_ids_N, return_inverse=True)
    member_NE = membership_NE(expert_ids_NK, num_experts).long()
    counts_UE = torch.zeros(len(vocab_U), num_experts, dtype=torch.long).index_add_(0, inverse_N, member_NE)
    return vocab_U, counts_UE, torch.bincount(inverse_N, minlength=len(vocab_U))


def _vocab_score(counts_UE: Tensor, occ_U: Tensor, min_count: int) -> float:
    keep_U = occ_U >= min_count
    if not keep_U.any():
        return 0.0
    best_U = counts_UE[keep_U].max(-1).values.float()
    return float(best_U.sum() / occ_U[keep_U].sum())


def vocabulary_specialization(expert_ids_NK: Tensor, token_ids_N: Tensor, *, num_experts: int,
                              min_count: int = 1, top_n: int = 10, seed: int = 0) -> dict:
    """For each token id, the fraction of its occurrences processed by its most frequent expert,
    averaged over occurrences of ids seen at least `min_count` times (OLMoE's vocabulary
    specialization). 1 = every id always meets the same expert. Baselines: k/E (uniform routing)
    and the same score with token ids shuffled across positions (which also carries the upward
    bias of rare ids: an id seen once scores 1 by construction).

    `top_tokens[e]`: up to `top_n` ids (seen >= min_count times) with the largest share of their
    occurrences at expert e: [token id, share, occurrences].
    """
    vocab_U, counts_UE, occ_U = token_expert_counts(expert_ids_NK, token_ids_N, num_experts=num_experts)
    gen = torch.Generator().manual_seed(seed)
    shuffled = token_ids_N[torch.randperm(token_ids_N.numel(), generator=gen)]
    _, sh_counts_UE, sh_occ_U = token_expert_counts(expert_ids_NK, shuffled, num_experts=num_experts)
    share_UE = counts_UE.float() / occ_U.clamp_min(1)[:, None].float()
    keep_U = occ_U >= min_count
    top_tokens = []
    for e in range(num_experts):
        # rank by share, then by how often the id went to e (stable on ties)
        key_U = torch.where(keep_U & (counts_UE[:, e] > 0), share_UE[:, e] * 1e9 + counts_UE[:, e].float(),
                            torch.tensor(-1.0))
        order = torch.argsort(key_U, descending=True, stable=True)[:top_n]
        top_tokens.append([[int(vocab_U[u]), float(share_UE[u, e]), int(occ_U[u])]
                           for u in order.tolist() if key_U[u] >= 0])
    return {"score": _vocab_score(counts_UE, occ_U, min_count),
            "score_shuffled": _vocab_score(sh_counts_UE, sh_occ_U, min_count),
            "uniform": mean_slots(expert_ids_NK) / num_experts,
            "min_count": min_count, "distinct_tokens": int(keep_U.sum()), "top_tokens": top_tokens}


# ---- co-activation -----------------------------------------------------------------------------
def coactivation(expert_ids_NK: Tensor, *, num_experts: int) -> Tensor:
    """float (E, E): P(b | a), the fraction of tokens routed to a that are also routed to b
    (within one token's slots). The diagonal is 0 (a pair needs two experts); a row of an expert
    that received no tokens is 0. Uniform top-k routing gives (k-1)/(E-1) off the diagonal."""
    member_NE = membership_NE(expert_ids_NK, num_experts).float()
    both_EE = member_NE.T @ member_NE
    p_EE = both_EE / both_EE.diagonal().clamp_min(1)[:, None]
    return p_EE.fill_diagonal_(0.0)


def coactivation_stats(expert_ids_NK: Tensor, *, num_experts: int) -> dict:
    p_EE = coactivation(expert_ids_NK, num_experts=num_experts)
    k = mean_slots(expert_ids_NK)
    used_E = load_counts(expert_ids_NK, num_experts) > 0
    return {"p_b_given_a": p_EE.tolist(),
            "mean_max": float(p_EE.max(-1).values[used_E].mean()) if used_E.any() and num_experts > 1 else 0.0,
            "uniform": (k - 1) / (num_experts - 1) if num_experts > 1 and k >= 1 else 0.0}


# ---- locality ----------------------------------------------------------------------------------
def consecutive_pairs(sequence_N: Tensor, position_N: Tensor) -> tuple[Tensor, Tensor]:
    """(i_P, j_P): token j is token i's successor (same sequence, next position)."""
    N = sequence_N.numel()
    if N < 2:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    order = torch.argsort(sequence_N * (int(position_N.max()) + 2) + position_N, stable=True)
    a, b = order[:-1], order[1:]
    keep = (sequence_N[a] == sequence_N[b]) & (position_N[b] == position_N[a] + 1)
    return a[keep], b[keep]


def _pair_stats(expert_ids_NK: Tensor, i_P: Tensor, j_P: Tensor, num_experts: int) -> tuple[float, float]:
    first_i, first_j = expert_ids_NK[i_P, 0], expert_ids_NK[j_P, 0]
    both = (first_i >= 0) & (first_j >= 0)
    same_first = float((first_i == first_j)[both].float().mean()) if both.any() else 0.0
    member_NE = membership_NE(expert_ids_NK, num_experts)
    share = (member_NE[i_P] & member_NE[j_P]).any(-1)
    return same_first, float(share.float().mean()) if share.numel() else 0.0


def locality(expert_ids_NK: Tensor, sequence_N: Tensor, position_N: Tensor, *, num_experts: int,
             seed: int = 0) -> dict:
    """How often consecutive tokens keep the same first expert (column 0) / share any expert, and
    the chance rates: uniform routing (1/E; 1 - C(E-k, k)/C(E, k)), the load-aware rate for the
    first expert (sum_e p_e^2 over the first-expert frequencies p), and random token pairs (each
    token paired with a random other token instead of its successor). A constant router gives 1."""
    i_P, j_P = consecutive_pairs(sequence_N, position_N)
    same_first, share_any = _pair_stats(expert_ids_NK, i_P, j_P, num_experts)
    gen = torch.Generator().manual_seed(seed)
    rand_j = j_P[torch.randperm(j_P.numel(), generator=gen)]
    rand_first, rand_share = _pair_stats(expert_ids_NK, i_P, rand_j, num_experts)
    first = expert_ids_NK[:, 0] if expert_ids_NK.shape[1] else expert_ids_NK.new_zeros(0)
    first = first[first >= 0]
    p_E = torch.bincount(first, minlength=num_experts).float() / max(first.numel(), 1)
    k = min(round(mean_slots(expert_ids_NK)), num_experts)
    no_share = math.comb(num_experts - k, k) / math.comb(num_experts, k) if k else 1.0
    return {"pairs": int(i_P.numel()),
            "same_first": same_first, "same_first_uniform": 1.0 / num_experts,
            "same_first_load": float((p_E * p_E).sum()), "same_first_random_pairs": rand_first,
            "share_any": share_any, "share_any_uniform": 1.0 - no_share, "share_any_random_pairs": rand_share}


def lru_hit_rate(expert_ids_NK: Tensor, sequence_N: Tensor, position_N: Tensor, *, capacity: int) -> float:
    """Hit rate of an LRU cache of `capacity` experts (one layer) replaying each sequence's tokens
    in order, empty at the start of every sequence; each valid slot is one access."""
    if capacity < 1:
        raise ValueError(f"capacity={capacity} is invalid: an expert cache holds at least 1 expert")
    order = torch.argsort(sequence_N * (int(position_N.max()) + 2 if position_N.numel() else 1) + position_N,
                          stable=True)
    ids = expert_ids_NK[order].tolist()
    seqs = sequence_N[order].tolist()
    hits = accesses = 0
    cache: OrderedDict[int, None] = OrderedDict()
    previous = None
    for seq, row in zip(seqs, ids):
        if seq != previous:
            cache.clear()
            previous = seq
        for e in row:
            if e < 0:
                continue
            accesses += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / accesses if accesses else 0.0


def cache_stats(expert_ids_NK: Tensor, sequence_N: Tensor, position_N: Tensor, *, num_experts: int,
                capacities: tuple[int, ...], seed: int = 0) -> list[dict]:
    """LRU hit rate per cache size, beside its baselines: the same replay with the tokens shuffled
    across the trace (keeps every expert's frequency, removes order), and the replay of uniformly
    random top-k routing of the same tokens (which is capacity/E for top-1)."""
    gen = torch.Generator().manual_seed(seed)
    N = expert_ids_NK.shape[0]
    shuffled_NK = expert_ids_NK[torch.randperm(N, generator=gen)]
    k = min(max(round(mean_slots(expert_ids_NK)), 1), num_experts)
    uniform_NK = torch.rand(N, num_experts, generator=gen).topk(k, dim=-1).indices
    out = []
    for c in capacities:
        out.append({"capacity": c,
                    "lru_hit_rate": lru_hit_rate(expert_ids_NK, sequence_N, position_N, capacity=c),
                    "lru_hit_rate_shuffled": lru_hit_rate(shuffled_NK, sequence_N, position_N, capacity=c),
                    "uniform": lru_hit_rate(uniform_NK, sequence_N, position_N, capacity=c)})
    return out


# ---- saturation --------------------------------------------------------------------------------
def topk_overlap(expert_ids_NK: Tensor, reference_NK: Tensor, *, num_experts: int) -> float:
    """Mean over tokens of |experts ∩ reference experts| / |reference experts| (OLMoE's router
    saturation when `reference` is the final checkpoint's routing of the same tokens)."""
    if expert_ids_NK.shape[0] != reference_NK.shape[0]:
        raise ValueError(f"routing of {expert_ids_NK.shape[0]} tokens cannot be compared with "
                         f"{reference_NK.shape[0]}; route the same tokens")
    a_NE, r_NE = membership_NE(expert_ids_NK, num_experts), membership_NE(reference_NK, num_experts)
    ref_N = r_NE.sum(-1)
    keep = ref_N > 0
    if not keep.any():
        return 0.0
    return float(((a_NE & r_NE).sum(-1)[keep].float() / ref_N[keep].float()).mean())
