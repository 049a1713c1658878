"""Rotary position embedding (Su et al. 2021) and its context-extension variants, as pure functions.

`inv_freq` gives the per-pair frequencies and the cos/sin scale of a `RopeConfig` (formulas as
transformers 5.x `modeling_rope_utils`), `rope_cos_sin` evaluates them at positions, and
`apply_rope` rotates the first `rot_dim` dims of q or k (halves, or interleaved pairs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.kernels import cpu as cpu_kernels
from moekit.model.config import ModelConfig, RopeConfig


def _mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale_factor(rope: RopeConfig | None) -> float:
    """Extra multiplier on the softmax scale: DeepSeek's YaRN mscale_all_dim squared, else 1."""
    if rope is None or rope.scaling == "none" or not rope.mscale_all_dim:
        return 1.0
    m = _mscale(rope.factor, rope.mscale_all_dim)
    return m * m


def inv_freq(
    rope: RopeConfig, rot_dim: int, *, seq_len: int, max_seq_len: int, device: torch.device | None = None
) -> tuple[Tensor, float]:
    """Inverse frequencies (rot_dim // 2,) fp32 and the factor cos and sin are multiplied by.

    Args:
        rot_dim: dims that rotate (even).
        seq_len: positions seen so far (dynamic NTK and longrope depend on it).
        max_seq_len: the model's context length (dynamic NTK's reference when
            `original_max_position` is None).
    """
    base, dim = rope.theta, rot_dim
    exponent_R = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    kind = rope.scaling
    if kind == "ntk_alpha":
        # Hunyuan's static NTK-aware base: theta * alpha^(d / (d - 2)).
        base = base * rope.factor ** (dim / (dim - 2))
    if kind == "dynamic":
        # Dynamic NTK (transformers `_compute_dynamic_ntk_parameters`): grow the base past the context.
        ref = rope.original_max_position or max_seq_len
        n = max(seq_len, ref)
        base = base * ((rope.factor * n / ref) - (rope.factor - 1)) ** (dim / (dim - 2))
    if kind == "longrope":
        assert rope.short_factor is not None and rope.long_factor is not None
        orig = rope.original_max_position
        assert orig is not None
        table = rope.long_factor if seq_len > orig else rope.short_factor
        if len(table) != dim // 2:
            raise ValueError(f"rope longrope factors have {len(table)} entries; need rot_dim/2 = {dim // 2}")
        ext_R = torch.tensor(table, dtype=torch.float32, device=device)
        freq_R = 1.0 / (ext_R * base**exponent_R)
        if rope.attention_factor is not None:
            scale = rope.attention_factor
        elif rope.short_mscale is not None and rope.long_mscale is not None:
            scale = rope.long_mscale if seq_len > orig else rope.short_mscale
        else:
            f = max_seq_len / orig
            scale = 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(orig))
        return freq_R, scale
    freq_R = 1.0 / (base**exponent_R)
    if kind == "linear":
        return freq_R / rope.factor, 1.0
    if kind == "yarn":
        return _yarn(rope, dim, base, device)
    if kind == "llama3":
        return _llama3(rope, freq_R), 1.0
    return freq_R, 1.0


def _yarn(rope: RopeConfig, dim: int, base: float, device: torch.device | None) -> tuple[Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between (sec. 3.2)."""
    factor, orig = rope.factor, rope.original_max_position
    assert orig is not None
    if rope.attention_factor is not None:
        scale = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        scale = _mscale(factor, rope.mscale) / _mscale(factor, rope.mscale_all_dim)
    else:
        scale = _mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast or 32), correction_dim(rope.beta_slow or 1)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_R = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs_R = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation_R = 1 - ramp_R
    freq_R = (1.0 / (factor * pos_freqs_R)) * (1 - extrapolation_R) + (1.0 / pos_freqs_R) * extrapolation_R
    return freq_R, scale


def _llama3(rope: RopeConfig, freq_R: Tensor) -> Tensor:
    """Llama 3.1 bands: long wavelengths / factor, short ones kept, smooth in between."""
    orig = rope.original_max_position
    assert orig is not None
    low_wavelen = orig / rope.low_freq_factor
    high_wavelen = orig / rope.high_freq_factor
    wavelen_R = 2 * math.pi / freq_R
    scaled_R = torch.where(wavelen_R > low_wavelen, freq_R / rope.factor, freq_R)
    smooth_R = (orig / wavelen_R - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed_R = (1 - smooth_R) * scaled_R / rope.factor + smooth_R * scaled_R
    medium_R = ~(wavelen_R < high_wavelen) * ~(wavelen_R > low_wavelen)
    return torch.where(medium_R, smoothed_R, scaled_R)


def rope_cos_sin(
    rope: RopeConfig, rot_dim: int, positions_S: Tensor, *, max_seq_len: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin (S, rot_dim // 2) at integer positions, scaled and cast to `dtype`."""
    seq_len = int(positions_S.max()) + 1 if positions_S.numel() else 0
    freq_R, scale = inv_freq(rope, rot_dim, seq_len=seq_len, max_seq_len=max_seq_len,
                             device=positions_S.device)
    angles_SR = positions_S.float()[:, None] * freq_R[None, :]
    return (angles_SR.cos() * scale).to(dtype), (angles_SR.sin() * scale).to(dtype)


# Positions up to which, without autograd, apply_rope runs as one CPU kernel call (a decode step).
KERNEL_MAX_POSITIONS = 8


def apply_rope(x_BHSd: Tensor, cos_SR: Tensor, sin_SR: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate the first 2R dims of x (B, H, S, d); the remaining d - 2R dims pass through.

    Half layout (Llama, GPT-NeoX): pair dim j with dim j + R. Interleaved (DeepSeek): pair 2j with
    2j+1; the output is written de-interleaved (rotated evens, then odds), as transformers'
    DeepSeek-V3 does. q and k are permuted alike, so every q.k product is unchanged.
    """
    R = cos_SR.shape[-1]
    tables_ok = cos_SR.dim() == 2 or (cos_SR.dim() == 4 and cos_SR.shape[1] == 1)  # (S, R) or (B, 1, S, R)
    if (x_BHSd.shape[2] <= KERNEL_MAX_POSITIONS and tables_ok and x_BHSd.stride(-1) == 1
            and cpu_kernels.supports(x_BHSd)):
        return cpu_kernels.rope(x_BHSd, cos_SR, sin_SR, interleaved=interleaved)  # a decode step
    rot, rest = x_BHSd[..., : 2 * R], x_BHSd[..., 2 * R:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :R], rot[..., R:]
    out = torch.cat((x1 * cos_SR - x2 * sin_SR, x2 * cos_SR + x1 * sin_SR), dim=-1)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def row_cos_sin(cfg: ModelConfig, pos_BS: Tensor, *, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin (B, 1, S, R) for per-row positions: each row as if it were alone (the
    length-dependent RoPE kinds, dynamic NTK and longrope, see only that row's length)."""
    assert cfg.rope is not None
    B, S = pos_BS.shape
    if cfg.rope.scaling in ("dynamic", "longrope"):
        rows = [rope_cos_sin(cfg.rope, cfg.rotary_dim, pos_BS[b], max_seq_len=cfg.max_seq_len, dtype=dtype)
                for b in range(B)]
        cos_BSR, sin_BSR = torch.stack([c for c, _ in rows]), torch.stack([s for _, s in rows])
    else:
        cos_TR, sin_TR = rope_cos_sin(cfg.rope, cfg.rotary_dim, pos_BS.reshape(-1),
                                      max_seq_len=cfg.max_seq_len, dtype=dtype)
        cos_BSR, sin_BSR = cos_TR.view(B, S, -1), sin_TR.view(B, S, -1)
    return cos_BSR[:, None], sin_BSR[:, None]
