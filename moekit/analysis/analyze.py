"""`analyze(model, batches, labels) -> Analysis`: run a model, trace its routing, compute every metric.

The model is any module whose forward returns a `ModelOutput` with `routing` (one RoutingDecision per
layer, None for dense ones), e.g. `MoETransformer`. Batches are token tensors (B, S) or
(tokens_BS, mask_BS) pairs; labels give each sequence's domain. The result holds the routing
trace, per-layer metrics with their baselines, and (optionally) knock-out and saturation results;
`Analysis.to_dict()` is what `analysis.json` holds (keys documented in `ANALYSIS_KEYS`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.analysis import metrics as m
from moekit.analysis.collect import Batch, collect_trace, split_batch
from moekit.analysis.trace import LayerTrace, RoutingTrace

# analysis.json: key -> meaning (the README's analysis section describes the same keys).
ANALYSIS_KEYS: dict[str, str] = {
    "info": "model/corpus description: tokens, sequences, label_names, num_moe_layers",
    "layers[].layer": "decoder-layer index of this MoE layer",
    "layers[].num_experts, .k": "experts in the layer; mean valid slots per token (top_k)",
    "layers[].load": "tokens_per_expert, load_fraction, max_vio, max_vio_uniform (random routing)",
    "layers[].dropped_fraction": "capacity-dropped slots / chosen slots",
    "layers[].entropy": "router_entropy (nats), router_entropy_normalized (/log E), router_entropy_uniform",
    "layers[].domain": "share[g][e] (share of domain g's tokens at expert e), tokens_per_domain, max_share, "
                       "mean_max_share, mean_max_share_shuffled (shuffled labels), uniform (k/E)",
    "layers[].vocabulary": "score, score_shuffled, uniform (k/E), min_count, distinct_tokens, "
                           "top_tokens[e] = [[token id, share, occurrences, text], ...]",
    "layers[].coactivation": "p_b_given_a[a][b], mean_max, uniform ((k-1)/(E-1))",
    "layers[].locality": "same_first, share_any and their *_uniform, *_load, *_random_pairs baselines",
    "layers[].cache": "per capacity (experts cached per layer): lru_hit_rate, lru_hit_rate_shuffled, uniform (random routing)",
    "knockout": "method, base_loss, experts[l][i] = {expert, tokens, loss, delta}, shared[l], top_n",
    "saturation": "steps, overlap[c][l]: mean top-k overlap of checkpoint c with the final model",
}


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig:
    """Settings of the metrics.

    Args:
        min_count: token ids seen fewer times are left out of vocabulary specialization.
        top_n: top tokens kept per expert.
        cache_capacities: LRU cache sizes (experts per layer) to simulate; None = (1, k, 2k).
        cache_tokens: the cache is simulated (a Python loop) on whole sequences, evenly spaced over
            the trace, holding about this many tokens.
        seed: seed of every shuffled or random baseline.
    """

    min_count: int = 5
    top_n: int = 10
    cache_capacities: tuple[int, ...] | None = None
    cache_tokens: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.min_count, int) or self.min_count < 1:
            raise ValueError(f"min_count={self.min_count!r} is invalid: must be a positive integer")
        if not isinstance(self.top_n, int) or self.top_n < 0:
            raise ValueError(f"top_n={self.top_n!r} is invalid: must be an integer >= 0")
        if not isinstance(self.cache_tokens, int) or self.cache_tokens < 1:
            raise ValueError(f"cache_tokens={self.cache_tokens!r} is invalid: must be a positive integer")
        if self.cache_capacities is not None and any(c < 1 for c in self.cache_capacities):
            raise ValueError(f"cache_capacities={self.cache_capacities!r} is invalid: each must be >= 1")


@dataclass
class Analysis:
    """A routing trace and everything computed from it; `to_dict()` is analysis.json."""

    trace: RoutingTrace
    layers: list[dict]
    info: dict = field(default_factory=dict)
    knockout: dict | None = None
    saturation: dict | None = None

    def to_dict(self) -> dict:
        return {"info": self.info, "layers": self.layers, "knockout": self.knockout,
                "saturation": self.saturation}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def cache_subset(sequence_N: Tensor, max_tokens: int) -> Tensor:
    """bool (N,): whole sequences, evenly spaced over the trace, holding about `max_tokens` tokens."""
    N = sequence_N.numel()
    if N <= max_tokens:
        return torch.ones(N, dtype=torch.bool)
    seq_ids = torch.unique(sequence_N)
    n = max(1, round(len(seq_ids) * max_tokens / N))
    picked = seq_ids[torch.linspace(0, len(seq_ids) - 1, n).round().long().unique()]
    return torch.isin(sequence_N, picked)


def analyze_layer(lt: LayerTrace, trace: RoutingTrace, config: AnalysisConfig) -> dict:
    """Every metric of one layer's routing, each beside its baselines."""
    E, ids_NK = lt.num_experts, lt.expert_ids_NK
    k = m.mean_slots(ids_NK)
    capacities = config.cache_capacities or tuple(sorted({1, max(round(k), 1), max(2 * round(k), 1)}))
    sub_N = cache_subset(trace.sequence_N, config.cache_tokens)
    out: dict = {
        "layer": lt.layer, "num_experts": E, "k": k,
        "load": m.load_stats(ids_NK, E, seed=config.seed),
        "dropped_fraction": m.dropped_fraction(ids_NK, lt.selected_NK),
        "entropy": m.entropy_stats(lt.entropy_N, E),
        "vocabulary": m.vocabulary_specialization(ids_NK, trace.token_ids_N, num_experts=E,
                                                  min_count=config.min_count, top_n=config.top_n,
                                                  seed=config.seed),
        "coactivation": m.coactivation_stats(ids_NK, num_experts=E),
        "locality": m.locality(ids_NK, trace.sequence_N, trace.position_N, num_experts=E, seed=config.seed),
        "cache": m.cache_stats(ids_NK[sub_N], trace.sequence_N[sub_N], trace.position_N[sub_N], num_experts=E,
                               capacities=tuple(c for c in capacities if c <= E) or (1,), seed=config.seed),
    }
    if trace.labels_N is not None:
        out["domain"] = m.domain_specialization(ids_NK, trace.labels_N, num_experts=E,
                                                num_domains=len(trace.label_names),
                                                sequence_N=trace.sequence_N, seed=config.seed)
    return out


def analyze_trace(trace: RoutingTrace, config: AnalysisConfig = AnalysisConfig(), *,
                  decode=None) -> Analysis:
    """All metrics of a recorded trace. `decode(token_id) -> str` adds text to the top tokens."""
    layers = [analyze_layer(lt, trace, config) for lt in trace.layers]
    if decode is not None:
        for layer in layers:
            for row in layer["vocabulary"]["top_tokens"]:
                for entry in row:
                    entry.append(decode(entry[0]))
    info = {"tokens": trace.num_tokens, "sequences": int(torch.unique(trace.sequence_N).numel()),
            "label_names": list(trace.label_names), "num_moe_layers": len(trace.layers)}
    return Analysis(trace=trace, layers=layers, info=info)


def spread_batches(batches: Sequence[Batch], sequences: int) -> list[Batch]:
    """Whole batches spread evenly over `batches` (so every domain appears) holding about
    `sequences` sequences: the subset knock-out and saturation are measured on."""
    if sequences < 1:
        raise ValueError(f"sequences={sequences} is invalid: must be >= 1")
    per = max(split_batch(batches[0])[0].shape[0], 1)
    n = min(len(batches), max(1, -(-sequences // per)))
    step = len(batches) / n
    return [batches[int(i * step)] for i in range(n)]


def analyze(model: nn.Module, batches: Iterable[Batch], labels: Sequence[Tensor] | None = None, *,
            label_names: Sequence[str] = (), config: AnalysisConfig = AnalysisConfig(), decode=None,
            knockout: bool | int = False, knockout_method: str = "auto", knockout_sequences: int | None = None,
            checkpoints: Sequence[tuple[int, nn.Module]] = ()) -> Analysis:
    """Run `model` on `batches` and compute every routing metric (and, if asked, the knock-out
    and the router saturation).

    Args:
        model: forward(tokens_BS, mask_BS=...) -> ModelOutput with `routing`.
        batches: token tensors (B, S) or (tokens_BS, mask_BS) pairs; mask False marks padding.
        labels: one long (B,) tensor per batch (index into `label_names`), or None.
        decode: token id -> text, for the top tokens per expert.
        knockout: False; True for every expert of every layer; an int n for the n most used
            experts of each layer (see `moekit.analysis.knockout`).
        knockout_sequences: measure knock-out and saturation on about this many sequences
            (`spread_batches`); None = all.
        checkpoints: (step, model) of earlier checkpoints of `model`'s run, for router saturation.
    """
    batches = list(batches)
    trace = collect_trace(model, batches, labels, label_names=label_names)
    result = analyze_trace(trace, config, decode=decode)
    subset = batches if knockout_sequences is None else spread_batches(batches, knockout_sequences)
    if knockout is not False:
        from moekit.analysis.knockout import knockout_losses

        top_n = None if knockout is True else int(knockout)
        counts = [torch.tensor(layer["load"]["tokens_per_expert"]) for layer in result.layers]
        result.knockout = knockout_losses(model, subset, counts=counts, top_n=top_n, method=knockout_method)
    if checkpoints:
        from moekit.analysis.sources import router_saturation

        result.saturation = router_saturation(list(checkpoints), model, subset)
    return result
