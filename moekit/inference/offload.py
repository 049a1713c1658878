"""Offloaded experts: attention, norms, embeddings, routers and shared experts resident; routed
experts read on demand from the checkpoint into an `ExpertCache` under a byte budget.

`load_offloaded` (what `from_pretrained(path, offload_experts=True, expert_cache="2GB")` calls)
builds the model on the meta device, swaps every MoELayer's `experts` for an `OffloadedExperts`
(the same forward contract as experts/grouped.py's `Experts`: rows sorted by expert, counts per
expert) and fills only the resident weights. A layer call pins the experts it needs that are
resident, computes them first, then reads the others one at a time; the matmuls are those of
`Experts` (same operations on the same values), so logits equal the in-memory model's bit for bit
at any cache size. With prefetch, a hook on each MoE layer applies the next MoE layer's router to
the current hidden state and a background thread reads the predicted experts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.grouped import expert_matmul, row_blocks
from moekit.experts.layout import matmul
from moekit.hf.checkpoint import _to_empty, _Without, _zero_runtime_buffers, from_pretrained, resolve_dtype
from moekit.hf.convert import checkpoint_to_model
from moekit.hf.families import family
from moekit.hf.io import CONFIG_FILE, NATIVE_FILE, CheckpointReader, parse_size, read_config
from moekit.hf.native import read_native
from moekit.hf.save import TIED_HEAD, tied_copies
from moekit.inference.cache_policy import top_experts
from moekit.inference.expert_cache import POLICIES, CacheStats, ExpertCache, Key, Policy, SlotSpec, num_slots
from moekit.inference.expert_math import expert_forward, expert_param_shapes, expert_param_transposed
from moekit.inference.expert_store import ExpertStore
from moekit.inference.quant import (
    GROUP_SIZE,
    QuantFormat,
    QuantizedExperts,
    check_quantized_file,
    quantize_attention_meta,
    quantize_model,
)
from moekit.inference.quant import (
    quantize_attention as quantize_attention_layers,
)
from moekit.kernels import cpu as cpu_kernels
from moekit.layer import MoELayer
from moekit.model.config import ModelConfig
from moekit.model.transformer import MoETransformer

Quantize = Literal["int8", "int4"]


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How routed experts are offloaded.

    Attributes:
        expert_cache: the cache's byte budget: an int or e.g. "2GB", "500MiB".
        policy: "lru", "lfu", or "pinned" (the `pin` experts stay resident, the rest LRU).
        pin: for policy="pinned", (layer, expert) -> uses, a count table from a recorded run
            (e.g. `model_offload_stats(model).uses`); the most used fill up to `pin_fraction` of
            the slots.
        pin_fraction: share of the slots the pinned experts may hold (0 < f < 1).
        prefetch: read the experts the next MoE layer's router predicts on a background thread.
    """

    expert_cache: int | str
    policy: Policy = "lru"
    pin: dict[Key, int] = field(default_factory=dict)
    pin_fraction: float = 0.5
    prefetch: bool = False

    def __post_init__(self) -> None:
        try:
            parse_size(self.expert_cache)
        except ValueError:
            raise ValueError(f"expert_cache={self.expert_cache!r} is invalid: use bytes (int) or a size "
                             f"like '100MB', '2GB', '500MiB'") from None
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} is invalid: must be one of {list(POLICIES)}")
        if self.policy == "pinned" and not self.pin:
            raise ValueError("policy='pinned' needs pin= a (layer, expert) -> count table from a recorded "
                             "run, e.g. model_offload_stats(model).uses")
        if not 0 < self.pin_fraction < 1:
            raise ValueError(f"pin_fraction={self.pin_fraction} is invalid: must be in (0, 1)")

    @property
    def budget(self) -> int:
        return parse_size(self.expert_cache)


class ExpertFormat(Protocol):
    """How one expert sits in a cache slot and how it is computed (float here; quant.py's formats)."""

    def spec(self) -> SlotSpec: ...
    def fill(self, views: dict[str, Tensor], tensors: dict[str, Tensor]) -> None: ...
    def forward(self, x_rD: Tensor, views: dict[str, Tensor], *, fused_bias: bool) -> Tensor: ...


class FloatFormat:
    """Experts in the model dtype, computed with exactly `Experts`' operations."""

    def __init__(self, config: MoEConfig, dtype: torch.dtype, transposed: frozenset[str] | None = None) -> None:
        self.config, self.dtype = config, dtype
        self.shapes = expert_param_shapes(config)
        # the in-memory layout of each weight (same strides, same matmul kernel, same bits)
        self.transposed = expert_param_transposed(config) if transposed is None else transposed

    def spec(self) -> SlotSpec:
        return SlotSpec(tuple((n, s, self.dtype) for n, s in self.shapes.items()), self.transposed)

    def fill(self, views: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
        for name, view in views.items():
            view.copy_(tensors[name])  # the cast `load_weights` does with Parameter.copy_

    def forward(self, x_rD: Tensor, views: dict[str, Tensor], *, fused_bias: bool) -> Tensor:
        # fused_bias: Experts' decode path (plain matmuls), else its grouped path's kernel
        mm = matmul if fused_bias else expert_matmul
        return expert_forward(x_rD, views, self.config, fused_bias=fused_bias,
                              matmul=lambda x, name: mm(x, views[name]))


class OffloadedExperts(nn.Module):
    """Routed experts of MoE layer `layer` served from an ExpertCache (no parameters of their own).

    Forward: x_RD (R, D) rows sorted by expert, counts_E long (E,) -> y_RD (R, D), as `Experts`.
    """

    def __init__(self, config: MoEConfig, layer: int, cache: ExpertCache, fmt: ExpertFormat, *,
                 decode_max_rows: int = 64) -> None:
        super().__init__()
        self.config, self.layer, self.fmt = config, layer, fmt
        self.num_experts = config.num_experts
        self.decode_max_rows = decode_max_rows
        self.cache = cache

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        R = x_RD.shape[0]
        if counts_E.shape != (self.num_experts,):
            raise ValueError(f"counts_E has shape {tuple(counts_E.shape)}; expected ({self.num_experts},)")
        if int(counts_E.sum()) != R:
            raise ValueError(f"x_RD has {R} rows but counts_E sums to {int(counts_E.sum())}; pass exactly "
                             "the rows the counts describe, sorted by expert")
        fused_bias = 0 < R <= self.decode_max_rows  # Experts' decode path (addmm), else its grouped one
        blocks = {e: (lo, hi) for e, lo, hi in row_blocks(counts_E)}
        y_RD = x_RD.new_empty(R, self.config.d_model)
        order = self.cache.begin_call(self.layer, list(blocks))
        try:
            for e in order:
                key = (self.layer, e)
                views = self.cache.acquire(key)
                try:
                    lo, hi = blocks[e]
                    y_RD[lo:hi] = self.fmt.forward(x_RD[lo:hi], views, fused_bias=fused_bias)
                finally:
                    self.cache.release(key)
        finally:
            self.cache.end_call()
        return y_RD

    def slot_outputs(self, x_TD: Tensor, ids_TK: Tensor) -> Tensor | None:
        """`Experts.slot_outputs` on the cached experts: the same kernel, one expert at a time as
        the cache hands them over, so the outputs equal the in-memory model's bit for bit. None
        (dispatch as usual) where the kernel cannot run or the experts are quantized."""
        if (not isinstance(self.fmt, FloatFormat) or x_TD.dtype != self.fmt.dtype
                or not cpu_kernels.supports(x_TD)):
            return None
        T, K = ids_TK.shape
        o_TKD = torch.zeros(T, K, self.config.d_model, dtype=torch.float32)
        used = sorted({e for e in ids_TK.reshape(-1).tolist() if e >= 0})
        names = (["w_gate_EDF", "w_up_EDF"] if self.config.gated else ["w_in_EDF"]) + [
            "w_down_EFD" if self.config.gated else "w_out_EFD"]
        order = self.cache.begin_call(self.layer, used)
        try:
            for e in order:
                key = (self.layer, e)
                views = self.cache.acquire(key)
                try:
                    projections = [(views[n], views.get(f"b_{n[2:-4]}_E{n[-1]}")) for n in names]
                    pointers = cpu_kernels.expert_pointers(projections, self.config.activation, expert=e,
                                                           num_experts=self.num_experts)
                    if pointers is None:
                        return None
                    cpu_kernels.expert_rows(x_TD, ids_TK, pointers, only=e, out_TKD=o_TKD)
                finally:
                    self.cache.release(key)
        finally:
            self.cache.end_call()
        return o_TKD

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, cache_slots={self.cache.num_slots}"


def model_offload_stats(model: nn.Module) -> CacheStats:
    """The hit/miss/prefetch counters of a model loaded with offload_experts=True."""
    cache = getattr(model, "expert_cache", None)
    if not isinstance(cache, ExpertCache):
        raise ValueError("this model has no expert cache; load it with from_pretrained(path, "
                         "offload_experts=True, expert_cache=SIZE)")
    return cache.stats


def load_offloaded(path: str | Path, offload: OffloadConfig, *, dtype: torch.dtype | str | None = None,
                   device: str | torch.device = "cpu", quantize: Quantize | None = None,
                   quantize_attention: bool = False) -> MoETransformer:
    """A decoder checkpoint with its routed experts offloaded under `offload.budget` bytes.

    When the budget holds every routed expert, warns that offloading is not needed and loads the
    model in memory. Raises ValueError for a budget smaller than one expert.
    """
    hf_config, fam, model, layers, dtype = _meta_decoder(path, dtype)
    model_type = fam.model_type
    moe = layers[next(iter(layers))].config
    fmt = make_format(moe, dtype, quantize)
    if holds_everything(offload, fmt, layers, quantize):
        model = from_pretrained(path, dtype=dtype, device=device)
        if quantize is not None:
            quantize_model(model, quantize, attention=quantize_attention)  # type: ignore[arg-type]
        return model  # type: ignore[return-value]
    rules = fam.load_rules()
    store = ExpertStore(path, rules, {i: m.config.num_experts for i, m in layers.items()},
                        expert_param_shapes(moe))
    attach_cache(model, layers, store, fmt, offload, device=device)
    model = _load_resident(model, path, rules, fam.ignored_keys(hf_config), store.expert_keys,
                           dtype=dtype, device=device, name=f"model_type={model_type!r}")
    if quantize_attention:
        quantize_attention_layers(model, quantize or "int8")
    model.hf_config = hf_config  # type: ignore[attr-defined]
    return model


def _meta_decoder(path: str | Path, dtype: torch.dtype | str | None):
    """(config.json, family, the model on the meta device, its MoE layers by index, the load dtype)
    of a Hugging Face decoder checkpoint whose experts can be offloaded."""
    hf_config = read_config(path)
    file = Path(path) / CONFIG_FILE
    fam = family(hf_config.get("model_type"), where=str(file))
    config = fam.config_from_hf(hf_config, source=str(file))
    if not isinstance(config, ModelConfig):
        raise ValueError(f"{file}: model_type={fam.model_type!r} is an encoder-decoder; "
                         f"offload_experts supports decoder-only models")
    with torch.device("meta"):
        model = MoETransformer(config)
    layers = {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoELayer)}
    if not layers:
        raise ValueError(f"{path}: this model has no MoE layers; there are no experts to offload")
    if config.moe is None or config.moe.router == "soft":
        raise ValueError("offload_experts supports token- and expert-choice routers, not router='soft'")
    return hf_config, fam, model, layers, resolve_dtype(dtype, hf_config)


@dataclass(frozen=True)
class ExpertSizes:
    """Sizes an expert cache works with, for one checkpoint and format.

    slot_bytes: one expert in a cache slot (the budget holds budget // slot_bytes of them);
    read_bytes: decoder layer -> bytes a miss reads from the files; num_experts: decoder layer -> E.
    """

    slot_bytes: int
    read_bytes: dict[int, int]
    num_experts: dict[int, int]

    @property
    def total_bytes(self) -> int:
        """Every routed expert in slots: a budget this large loads the model in memory."""
        return self.slot_bytes * sum(self.num_experts.values())


def expert_sizes(path: str | Path, *, dtype: torch.dtype | str | None = None,
                 quantize: Quantize | None = None) -> ExpertSizes:
    """The sizes `from_pretrained(path, offload_experts=True, dtype=, quantize=)` would use (headers only)."""
    from moekit.hf.native import is_native

    if is_native(path) and read_native(path).quantize is not None:
        meta = read_native(path)
        if quantize is not None:
            raise ValueError(f"{path} already holds quantized weights; leave out quantize")
        quant = meta.quantize
        with torch.device("meta"):
            model = MoETransformer(meta.config)  # type: ignore[arg-type]
        layers = {i: m.mlp for i, m in enumerate(model.model.layers) if isinstance(m.mlp, MoELayer)}
        fmt: ExpertFormat = QuantFormat(next(iter(layers.values())).config,
                                        resolve_dtype(None, {"dtype": meta.dtype}), quant["method"],
                                        int(quant.get("group_size", GROUP_SIZE)))
        shapes, rules = {n: s for n, (s, _) in fmt.tensors.items()}, ()
    else:
        _, fam, _, layers, dtype = _meta_decoder(path, dtype)
        fmt = make_format(next(iter(layers.values())).config, dtype, quantize)
        shapes, rules = expert_param_shapes(next(iter(layers.values())).config), fam.load_rules()
    num_experts = {i: m.config.num_experts for i, m in layers.items()}
    store = ExpertStore(path, rules, num_experts, shapes)
    return ExpertSizes(slot_bytes=fmt.spec().nbytes, read_bytes={i: store.expert_nbytes(i) for i in layers},
                       num_experts=num_experts)


def holds_everything(offload: OffloadConfig, fmt: ExpertFormat, layers: dict[int, MoELayer],
                     quantize: str | None) -> bool:
    """True (with a warning: offloading is not needed) when the budget holds every routed expert;
    a ValueError when it cannot hold one."""
    spec = fmt.spec()
    total = spec.nbytes * sum(m.config.num_experts for m in layers.values())
    budget = offload.budget
    if budget < spec.nbytes:
        raise ValueError(f"expert_cache={offload.expert_cache!r} ({budget} bytes) is smaller than one expert "
                         f"({spec.nbytes} bytes{f', {quantize}' if quantize else ''}); give at least "
                         f"{spec.nbytes} bytes, or quantize the experts")
    if budget >= total:
        warnings.warn(f"expert_cache={offload.expert_cache!r} ({budget} bytes) holds all routed experts "
                      f"({total} bytes): offloading is not needed, loading the model in memory", stacklevel=4)
        return True
    return False


def attach_cache(model: MoETransformer, layers: dict[int, MoELayer], store: ExpertStore, fmt: ExpertFormat,
                 offload: OffloadConfig, *, device: str | torch.device) -> ExpertCache:
    """Build the cache under `offload.budget`, swap each MoE layer's experts for OffloadedExperts
    (model still on the meta device) and, with prefetch, add the router hooks."""
    spec = fmt.spec()

    def load(key: Key, views: dict[str, Tensor]) -> int:
        fmt.fill(views, store.read(*key))
        return store.expert_nbytes(key[0])

    slots = num_slots(offload.budget, spec.nbytes)
    sticky = (top_experts(offload.pin, int(slots * offload.pin_fraction))
              if offload.policy == "pinned" else [])
    cache = ExpertCache(spec, slots, load, policy=offload.policy, sticky=sticky,
                        prefetch=offload.prefetch, device=device)
    for i, layer in layers.items():
        layer.experts = OffloadedExperts(layer.config, i, cache, fmt)
    model.expert_cache = cache  # type: ignore[attr-defined]
    if offload.prefetch:
        add_prefetch_hooks(model, cache)
    return cache


def make_format(config: MoEConfig, dtype: torch.dtype, quantize: Quantize | None) -> ExpertFormat:
    if quantize is None:
        return FloatFormat(config, dtype)
    return QuantFormat(config, dtype, quantize)


def _load_resident(model: MoETransformer, path: str | Path, rules: tuple, ignore, expert_keys: set[str], *,
                   dtype: torch.dtype, device: str | torch.device, name: str,
                   cast: bool = True) -> MoETransformer:
    """Allocate and fill every weight but the routed experts (as `load_weights`, minus those keys).

    cast=False: the meta model already has its dtypes (quantized buffers keep theirs)."""
    with CheckpointReader(path) as reader:
        model = _to_empty(model.to(dtype) if cast else model, device)  # type: ignore[assignment]
        state = model.state_dict(keep_vars=True)
        copies = tied_copies(model.config)
        shapes = {k: tuple(v.shape) for k, v in state.items() if k not in copies}
        where = lambda key: f"{key} in {reader.path / reader.file_of(key)}" if key in reader else key
        with torch.no_grad():
            view = _Without(reader, set(copies) | expert_keys, ignore)
            for key, tensor in checkpoint_to_model(rules, view, shapes, where=where, name=name):
                state[key].copy_(tensor)
            _zero_runtime_buffers(model)
        if TIED_HEAD in copies and TIED_HEAD in reader:
            source = copies[TIED_HEAD]
            if not torch.equal(reader.get(TIED_HEAD).to(dtype), state[source].detach()):
                raise ValueError(f"{where(TIED_HEAD)} differs from {source}, but config.json ties them; fix "
                                 f"tie_word_embeddings in config.json")
    return model.eval()


def add_prefetch_hooks(model: MoETransformer, cache: ExpertCache) -> list:
    """On each MoE layer's input, predict the next MoE layer's experts with its router and prefetch them."""
    moe = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoELayer)]
    handles = []
    for (_, here), (nxt_idx, nxt) in zip(moe, moe[1:]):
        def hook(module, args, kwargs, nxt=nxt, nxt_idx=nxt_idx):
            x = args[0] if args else kwargs["x"]
            x_TD = x.reshape(-1, x.shape[-1])
            token_ids, mask = kwargs.get("token_ids"), kwargs.get("mask")
            with torch.no_grad():
                decision = nxt.router(x_TD, token_ids_T=None if token_ids is None else token_ids.reshape(-1),
                                      mask_T=None if mask is None else mask.reshape(-1))
            ids = decision.expert_ids_TK.unique().tolist()
            cache.prefetch(nxt_idx, [e for e in ids if e >= 0])
        handles.append(here.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def load_with_options(path: str | Path, *, dtype: torch.dtype | str | None, device: str | torch.device,
                      offload_experts: bool, expert_cache: int | str | None, quantize: str | None,
                      quantize_attention: bool = False, **options) -> MoETransformer:
    """`from_pretrained`'s offload / quantize keywords, checked and dispatched."""
    if quantize is not None and quantize not in ("int8", "int4"):
        raise ValueError(f"quantize={quantize!r} is invalid: must be 'int8', 'int4' or None")
    if not offload_experts:
        if expert_cache is not None or options:
            raise ValueError(f"expert_cache= and {sorted(options) or 'cache options'} need "
                             f"offload_experts=True")
        model = from_pretrained(path, dtype=dtype, device=device)
        return quantize_model(model, quantize, attention=quantize_attention)  # type: ignore[arg-type]
    if expert_cache is None:
        raise ValueError("offload_experts=True needs expert_cache=SIZE, the cache's byte budget (e.g. '2GB')")
    unknown = set(options) - {"policy", "pin", "pin_fraction", "prefetch"}
    if unknown:
        raise TypeError(f"from_pretrained got unexpected keyword(s) {sorted(unknown)}; offload options are "
                        f"policy, pin, pin_fraction, prefetch")
    return load_offloaded(path, OffloadConfig(expert_cache=expert_cache, **options), dtype=dtype,
                          device=device, quantize=quantize,  # type: ignore[arg-type]
                          quantize_attention=quantize_attention)


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", offload_experts: bool = False,
                   expert_cache: int | str | None = None, **offload_options) -> nn.Module:
    """Load a directory written by `save_quantized`, in memory or with its experts offloaded
    (the cache then reads the stored int8/int4 bytes as they are)."""
    file = Path(path) / NATIVE_FILE
    meta = read_native(path)
    quant = meta.quantize
    if quant is None:
        raise ValueError(f"{file}: no 'quantize' entry; this is not a quantized checkpoint (use "
                         f"moekit.from_pretrained)")
    check_quantized_file(path, quant)
    config, dtype = meta.config, resolve_dtype(None, {"dtype": meta.dtype})
    method, G = quant["method"], int(quant.get("group_size", GROUP_SIZE))
    with torch.device("meta"):
        model = MoETransformer(config).to(dtype)  # type: ignore[arg-type]
        layers = {i: layer.mlp for i, layer in enumerate(model.model.layers)
                  if isinstance(layer.mlp, MoELayer)}
        fmt = QuantFormat(next(iter(layers.values())).config, dtype, method, G)
        if quant.get("attention"):
            quantize_attention_meta(model, method, G)
    expert_keys: set[str] = set()
    if offload_experts:
        offload = OffloadConfig(expert_cache=expert_cache, **offload_options)  # type: ignore[arg-type]
        if not holds_everything(offload, fmt, layers, method):
            shapes = {n: s for n, (s, _) in fmt.tensors.items()}
            store = ExpertStore(path, (), {i: m.config.num_experts for i, m in layers.items()}, shapes)
            attach_cache(model, layers, store, fmt, offload, device=device)
            expert_keys = store.expert_keys
    elif expert_cache is not None or offload_options:
        raise ValueError("expert_cache= and cache options need offload_experts=True")
    if not expert_keys:
        with torch.device("meta"):
            for layer in layers.values():
                layer.experts = QuantizedExperts(layer.config, fmt)
    model = _load_resident(model, path, (), None, expert_keys, dtype=dtype, device=device, name=str(file),
                           cast=False)
    model.quantize = dict(quant)  # type: ignore[attr-defined]
    if meta.hf_config:
        model.hf_config = meta.hf_config  # type: ignore[attr-defined]
    return model
