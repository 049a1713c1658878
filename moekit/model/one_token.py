"""One decode token of one sequence as a fixed list of CPU kernel calls (`moekit.kernels.cpu`).

A batch-1 decode step of a small MoE spends more of its time in Python (module calls, checks,
small allocations) than in the kernels that read its weights. `OneTokenStep.build(model)` walks the
model once and binds every kernel call of a step to preallocated buffers and to the weights'
addresses; a step is then that list, plus the few calls that depend on the position (the RoPE
tables, the cache write, attention over the keys so far). It computes what the module path
computes (the same kernels on the same values in the same order, so the logits are bit-equal:
`tests/model/test_one_token.py`) for the decoders it covers:

- every layer attention: MHA/GQA, RoPE of any kind or none, optional q/k/v/o biases and per-head
  QK-norm; no sliding window, chunking, soft-cap, sinks, clipping or KV sharing;
- RMSNorm (no bias, no post-norms); feed-forward a dense MLP (run as its module), or an MoE layer
  with a token-choice top-k router without expert groups or capacity over in-memory experts,
  shared experts run as their module.

`build` returns None for any other model (the reason in `unsupported(model)`), and `MoETransformer`
runs its modules as usual; so it does, step by step, with autograd, in training mode, with a hook
on a module, a router recording or replaying, or after the weights moved.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.dispatch.sort import SortDispatcher, combine_slots
from moekit.experts.dense import DenseMLP
from moekit.experts.grouped import Experts
from moekit.kernels import cpu
from moekit.layer import MoELayer
from moekit.model.attention import Attention
from moekit.model.cache import RowCache
from moekit.model.norm import RMSNorm
from moekit.model.rope import row_cos_sin
from moekit.routing.topk import TopKRouter, group_limited
from moekit.types import ModelOutput, RoutingDecision


def unsupported(model: nn.Module) -> str | None:
    """Why `OneTokenStep` cannot run this model (None: it can)."""
    cfg = model.config
    if not cpu.available():
        return "moekit's CPU kernels are not built"
    if model.training:
        return "training mode (routers add noise, losses are computed)"
    weight = model.lm_head.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return f"weights on {weight.device.type} in {weight.dtype} (the kernels take CPU fp32/bf16)"
    if any(p.dtype != weight.dtype or p.device != weight.device for p in model.parameters()):
        return "parameters of mixed dtypes or devices"
    if cfg.norm != "rmsnorm" or cfg.norm_bias or cfg.post_norms or cfg.moe_parallel:
        return f"norm {cfg.norm!r} (bias {cfg.norm_bias}), post-norms {cfg.post_norms}, parallel MoE {cfg.moe_parallel}"
    if cfg.qk_norm not in ("none", "head") or cfg.clip_qkv is not None or cfg.attn_logit_softcap is not None:
        return "QK-norm other than per head, QKV clipping or logit soft-capping"
    if cfg.attn_sinks or cfg.kv_share_every != 1:
        return "attention sinks or cross-layer KV sharing"
    if cfg.rope is not None and cfg.rope.interleaved:
        return "interleaved RoPE"
    for i, layer in enumerate(model.model.layers):
        mixer = getattr(layer, "self_attn", None) or getattr(layer, "mamba", None)
        if type(mixer) is not Attention:
            return f"layer {i} mixes tokens with {type(mixer).__name__}, not plain attention"
        if cfg.layer_window(i) is not None or cfg.layer_chunk(i) is not None:
            return f"layer {i} attends in a window or chunk"
        if cfg.rope is not None and not cfg.uses_rope(i):
            return f"layer {i} has no RoPE while others do"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if cfg.qk_norm == "head":
            norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
        if any(type(n) is not RMSNorm or n.cast_to != "input" for n in norms):
            return f"layer {i} has a norm the kernel does not compute"
        if any(type(m) is not nn.Linear for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                  layer.self_attn.v_proj, layer.self_attn.o_proj)):
            return f"layer {i}'s attention projections are not plain nn.Linear (quantized?)"
        mlp = layer.mlp
        if isinstance(mlp, MoELayer):
            moe = mlp.config
            if (type(mlp) is not MoELayer or type(mlp.router) is not TopKRouter or type(mlp.experts) is not Experts
                    or type(mlp.dispatcher) is not SortDispatcher):
                return f"layer {i}'s MoE is not a top-k router over in-memory experts"
            if moe.capacity_factor is not None or moe.expert_capacity is not None:
                return f"layer {i}'s MoE drops tokens for capacity"
            if group_limited(moe.num_groups, moe.topk_groups):
                return f"layer {i}'s router selects within expert groups"
            if not mlp.router.gate.weight.is_contiguous() or mlp.experts.kernel_pointers() is None:
                return f"layer {i}'s router or experts are not stored as the kernels read them"
        elif type(mlp) is not DenseMLP:
            return f"layer {i}'s feed-forward is a {type(mlp).__name__}"
    if type(model.model.norm) is not RMSNorm or type(model.lm_head) is not nn.Linear:
        return "the final norm or LM head is not RMSNorm / nn.Linear"
    if model.lm_head.weight.stride(-1) != 1:
        return "the LM head is stored column-major"
    return None


class _Layer:
    """The buffers and bound kernel arguments of one decoder layer."""

    def __init__(self, step: OneTokenStep, index: int, layer: nn.Module) -> None:
        cfg, dt = step.config, step.dtype
        attn = layer.self_attn
        H, K, hd = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        self.index, self.layer = index, layer
        new = step.buffer
        self.h, self.q, self.k, self.v = new(cfg.d_model), new(H * hd), new(K * hd), new(K * hd)
        self.qr, self.kr, self.a, self.o = new(H * hd), new(K * hd), new(H * hd), new(cfg.d_model)
        self.h2 = new(cfg.d_model)
        self.like_kv = torch.empty(1, K, 1, hd, dtype=dt)  # the cache buffers' shape, for SlotStore.buffer
        self.calls: list[tuple] = [step.rmsnorm(step.x, layer.input_layernorm, self.h),
                                   step.linear(self.h, [(attn.q_proj, self.q), (attn.k_proj, self.k),
                                                        (attn.v_proj, self.v)])]
        q, k = self.q, self.k
        if cfg.qk_norm == "head":
            self.qn, self.kn = new(H * hd), new(K * hd)
            self.calls += [step.rmsnorm(q, attn.q_norm, self.qn, rows=H),
                           step.rmsnorm(k, attn.k_norm, self.kn, rows=K)]
            q, k = self.qn, self.kn
        if cfg.rope is not None:
            self.calls += [step.rope(q, H, hd, self.qr), step.rope(k, K, hd, self.kr)]
        else:
            self.qr, self.kr = q, k
        # attention: the keys' arguments (slot, length) are filled in each step
        self.attend = [self.qr.data_ptr(), 1, H, K, 0, hd, hd, 0, 0, 0, hd, 0, 0, 0, hd, step.mask.data_ptr(), 0,
                       attn.scale, self.a.data_ptr(), step.wt, step.threads]
        self.after_attention = [step.linear(self.a, [(attn.o_proj, self.o)]),
                                step.rmsnorm(step.x, layer.post_attention_layernorm, self.h2)]
        self.moe = layer.mlp if isinstance(layer.mlp, MoELayer) else None
        if self.moe is not None:
            moe = self.moe.config
            E, topk = moe.num_experts, moe.top_k
            router = self.moe.router
            self.slots = torch.empty(1, topk, cfg.d_model, dtype=torch.float32)
            self.route = [self.h2.data_ptr(), 1, cfg.d_model, E, topk, router.gate.weight.data_ptr(),
                          cpu.address(router.gate.bias), int(moe.score_func == "sigmoid"), int(moe.softmax_after_topk),
                          int(moe.normalize_topk), moe.routed_scaling_factor, 0,
                          0, 0, 0, 0, 0, step.wt]  # the selection bias (fp32) and the five outputs: per step
            p = self.moe.experts.kernel_pointers()
            assert p is not None
            self.experts = [self.h2.data_ptr(), 1, cfg.d_model, p.d_ff, topk, p.ptrs_3E.shape[1], 0, -1,
                            p.ptrs_3E.data_ptr(), cpu.address(p.bias_ptrs_3E), p.lds.data_ptr(), int(p.gated), step.wt,
                            cpu.ACTIVATIONS[p.activation], self.slots.data_ptr(), step.threads]
            self.pointers = p  # holds the address tables alive


class OneTokenStep:
    """A batch-1 decode step of `model` (see the module docstring). Build with `build(model)`;
    call with (tokens (1, 1), a RowCache of one row) for the ModelOutput the model would return."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.config = model, model.config
        cfg = self.config
        self.dtype = model.lm_head.weight.dtype
        self.wt, self.threads = cpu.wtype(self.dtype), torch.get_num_threads()
        self.fn = {name: cpu.entry(name) for name in
                   ("rmsnorm", "linear_rows", "rope", "attend_one", "topk_route", "expert_rows")}
        self._keep: list = []  # ctypes arrays bound into calls
        self.x = self.buffer(cfg.d_model)
        self.mask = torch.zeros(1, dtype=torch.float32)  # attention's additive mask: zeros, grown as needed
        if cfg.rope is not None:
            R = cfg.rotary_dim // 2
            self.cos, self.sin = torch.empty(1, R, dtype=self.dtype), torch.empty(1, R, dtype=self.dtype)
        self.layers = [_Layer(self, i, layer) for i, layer in enumerate(model.model.layers)]
        self.hf = self.buffer(cfg.d_model)
        self.final_norm = self.rmsnorm(self.x, model.model.norm, self.hf)
        self.lm_head = self.linear(self.hf, [(model.lm_head, None)])  # its output: a new tensor each step

    # ---- binding ----
    def buffer(self, n: int) -> Tensor:
        return torch.zeros(1, n, dtype=self.dtype)

    def rmsnorm(self, x: Tensor, norm: RMSNorm, y: Tensor, rows: int = 1) -> tuple:
        D = x.numel() // rows
        return (self.fn["rmsnorm"], (x.data_ptr(), rows, D, norm.weight.data_ptr(), norm.variance_epsilon,
                                     y.data_ptr(), self.wt))

    def linear(self, x: Tensor, projections: list[tuple[nn.Linear, Tensor | None]]) -> tuple:
        """The `linear_rows` call for these projections of x; an output given as None is for the
        caller to set in the last address table (args[8]) before each call."""
        tables = [cpu.addresses([m.weight.data_ptr() for m, _ in projections]),
                  cpu.addresses([m.weight.shape[0] for m, _ in projections]),
                  cpu.addresses([m.weight.stride(0) for m, _ in projections]),
                  cpu.addresses([cpu.address(m.bias) for m, _ in projections]),
                  cpu.addresses([cpu.address(y) for _, y in projections])]
        self._keep.append(tables)
        return (self.fn["linear_rows"], (x.data_ptr(), 1, x.shape[-1], len(projections), *tables, self.wt,
                                         self.threads))

    def rope(self, x: Tensor, heads: int, hd: int, y: Tensor) -> tuple:
        strides = cpu.addresses([heads * hd, hd, hd])
        self._keep.append(strides)
        return (self.fn["rope"], (x.data_ptr(), 1, heads, 1, hd, strides, self.cos.data_ptr(), self.sin.data_ptr(),
                                  0, self.cos.shape[-1], 0, y.data_ptr(), self.wt))

    def __reduce__(self):  # a copied or pickled model builds its own step (this one holds addresses)
        return (_no_step, ())

    # ---- validity ----
    def active(self, modules: list[nn.Module]) -> bool:
        """False while something the step would skip is on: a hook on one of the model's `modules`,
        a router recording or replaying decisions (the model then runs its modules)."""
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return False
        if any([m._forward_hooks or m._forward_pre_hooks for m in modules]):
            return False
        return not any(layer.moe is not None and (layer.moe.router.recording is not None or layer.moe.router.replay)
                       for layer in self.layers)

    # ---- running ----
    def __call__(self, tokens_BS: Tensor, cache: RowCache) -> ModelOutput:
        cfg, model = self.config, self.model
        assert cache.store is not None and cache.slots_B is not None and cache.start_B is not None
        slot, pos = int(cache.slots_B[0]), int(cache.start_B[0])
        T = pos + 1
        if T > cache.store.max_len:
            raise ValueError(f"sequence reaches position {T}, beyond the cache's max_len {cache.store.max_len}")
        if T > self.mask.numel():
            self.mask = torch.zeros(max(T, 2 * self.mask.numel()), dtype=torch.float32)
            for layer in self.layers:
                layer.attend[15] = self.mask.data_ptr()
        x = self.x
        x.copy_(model.model.embed_tokens.weight[int(tokens_BS[0, 0])])
        if cfg.embedding_multiplier != 1.0:
            x.copy_(x * cfg.embedding_multiplier)
        if cfg.rope is not None:
            cos, sin = row_cos_sin(cfg, cache.start_B[:, None], dtype=self.dtype)
            self.cos.copy_(cos.view(1, -1))
            self.sin.copy_(sin.view(1, -1))
        size = x.element_size()
        routing: list[RoutingDecision | None] = []
        attend, route, experts = self.fn["attend_one"], self.fn["topk_route"], self.fn["expert_rows"]
        for layer in self.layers:
            for fn, args in layer.calls:
                fn(*args)
            k_buf = cache.store.buffer(layer.index, 0, layer.like_kv, 2)  # (slots, K, max_len, hd)
            v_buf = cache.store.buffer(layer.index, 1, layer.like_kv, 2)
            k_buf[slot, :, pos].copy_(layer.kr.view(cfg.kv_heads, -1))
            v_buf[slot, :, pos].copy_(layer.v.view(cfg.kv_heads, -1))
            a = layer.attend  # (q, B, H, KV, T, d, e, k, skb, skh, skt, v, svb, svh, svt, mask, ...)
            a[4] = T
            a[7], a[9], a[10] = k_buf.data_ptr() + slot * k_buf.stride(0) * size, k_buf.stride(1), k_buf.stride(2)
            a[11], a[13], a[14] = v_buf.data_ptr() + slot * v_buf.stride(0) * size, v_buf.stride(1), v_buf.stride(2)
            attend(*a)
            fn, args = layer.after_attention[0]
            fn(*args)
            _residual_add(x, layer.o, cfg.residual_multiplier)
            fn, args = layer.after_attention[1]
            fn(*args)
            if layer.moe is None:
                routing.append(None)
                _residual_add(x, layer.layer.mlp(layer.h2), cfg.residual_multiplier)
                continue
            moe = layer.moe.config
            E, topk = moe.num_experts, moe.top_k
            logits, probs = torch.empty(1, E), torch.empty(1, E)
            ids, weights = torch.empty(1, topk, dtype=torch.int64), torch.empty(1, topk)
            counts = torch.empty(E, dtype=torch.int64)
            r = layer.route
            bias = layer.moe.router.expert_bias
            bias = None if bias is None else bias.float()  # a buffer the model's cast may have made bf16
            r[11] = cpu.address(bias)
            r[12], r[13], r[14], r[15], r[16] = (logits.data_ptr(), probs.data_ptr(), ids.data_ptr(),
                                                 weights.data_ptr(), counts.data_ptr())
            route(*r)
            layer.experts[6] = ids.data_ptr()
            experts(*layer.experts)
            y = combine_slots(layer.slots, weights).to(self.dtype)
            dense = layer.moe.dense_parts(layer.h2)
            if not isinstance(dense, float):
                y = y + dense
            _residual_add(x, y, cfg.residual_multiplier)
            routing.append(RoutingDecision(ids, weights, logits, probs, counts))
        fn, args = self.final_norm
        fn(*args)
        logits_BSV = torch.empty(1, 1, cfg.vocab_size, dtype=self.dtype)
        fn, args = self.lm_head
        args[8][0] = logits_BSV.data_ptr()
        fn(*args)
        if cfg.logits_scaling != 1.0:
            logits_BSV = logits_BSV / cfg.logits_scaling
        return ModelOutput(logits=logits_BSV, loss=None, aux_loss=None, routing=routing, cache=cache,
                           aux_losses={}, attention_routing=[None] * len(self.layers))

    @classmethod
    def build(cls, model: nn.Module) -> OneTokenStep | None:
        """The bound step of `model`, or None where `unsupported(model)` names a reason."""
        return None if unsupported(model) is not None else cls(model)


_data_ptr = torch._C.TensorBase.data_ptr


class _Watch:
    """What a step's bound addresses depend on, read in one pass over the model's module list:
    each module's mode and children, each tensor's address, the thread count (walking the model
    with `parameters()` each step would cost a tenth of a step; this costs about 1%)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.children = [m._modules for m in self.modules if m._modules]
        self.tensors = [d for m in self.modules for d in (m._parameters, m._buffers) if d]

    def key(self) -> tuple:
        return (torch.get_num_threads(), [m.training for m in self.modules],
                [id(c) for d in self.children for c in d.values()],
                [0 if t is None else _data_ptr(t) for d in self.tensors for t in d.values()])


def step_for(model: nn.Module) -> OneTokenStep | None:
    """The model's bound step, rebuilt when what it depends on changed; None where it cannot run now."""
    cached = model.__dict__.get("_one_token_step")
    if cached is None or cached[0].key() != cached[1]:
        watch = _Watch(model)
        cached = (watch, watch.key(), OneTokenStep.build(model))
        model.__dict__["_one_token_step"] = cached
    step = cached[2]
    return step if step is not None and step.active(cached[0].modules) else None


def _no_step() -> None:
    return None


def _residual_add(x: Tensor, h: Tensor, multiplier: float) -> None:
    """x += h (times the multiplier, rounded first as `moekit.model.block.residual_add` rounds)."""
    h = h.reshape(x.shape)
    x.add_(h if multiplier == 1.0 else h * multiplier)
