"""What a checkpoint directory holds, read from headers only: model_type, config, shards, tensors.

`checkpoint_summary(path)` never reads tensor data, so it is instant even for huge checkpoints;
`moekit inspect DIR` prints it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from moekit.hf.families import FAMILIES
from moekit.hf.io import CONFIG_FILE, CheckpointReader, read_config
from moekit.hf.native import is_native, read_native
from moekit.model.accounting import active_params, num_params
from moekit.model.config import ModelConfig
from moekit.model.encoder_decoder import SwitchConfig

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1}


def _config_summary(cfg: ModelConfig | SwitchConfig) -> dict[str, Any]:
    if isinstance(cfg, SwitchConfig):
        return {"encoder_layers": cfg.num_layers, "decoder_layers": cfg.decoder_layers,
                "d_model": cfg.d_model,
                "heads": cfg.num_heads, "vocab": cfg.vocab_size, "params": num_params(cfg),
                "experts": cfg.num_experts, "top_k": 1, "expert_capacity": cfg.expert_capacity}
    moe = cfg.moe
    out: dict[str, Any] = {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                           "kv_heads": cfg.kv_heads, "vocab": cfg.vocab_size, "context": cfg.max_seq_len,
                           "params": num_params(cfg), "active_params": active_params(cfg)}
    if moe is not None:
        out.update(experts=moe.num_experts, top_k=moe.top_k, expert_d_ff=moe.d_ff,
                   shared_experts=moe.num_shared_experts, router=f"{moe.router}/{moe.score_func}",
                   moe_layers=sum(cfg.is_moe(i) for i in range(cfg.n_layers)))
    return out


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """Summary of a Hugging Face or moekit-layout checkpoint directory (headers only).

    Returns a dict: format, model_type, config (translated summary, or the error translating it),
    expert_layout, shards [{file, tensors, bytes}], dtypes {dtype: tensors}, tensors (count),
    total_bytes, and sample [(name, shape, dtype)] of the first tensors.
    """
    path = Path(path)
    summary: dict[str, Any] = {"path": str(path)}
    config: ModelConfig | SwitchConfig | str
    if is_native(path):
        meta = read_native(path)
        summary["format"], summary["model_type"] = "moekit", (meta.hf_config or {}).get("model_type")
        config = meta.config
    else:
        hf = read_config(path)
        model_type = hf.get("model_type")
        summary["format"], summary["model_type"] = "huggingface", model_type
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            config = f"model_type={model_type!r} is not supported by moekit"
        else:
            try:
                config = FAMILIES[model_type].config_from_hf(hf, source=str(path / CONFIG_FILE))
            except (ValueError, TypeError) as err:
                config = f"config.json does not translate: {err}"
    summary["config"] = config if isinstance(config, str) else _config_summary(config)
    with CheckpointReader(path) as reader:
        keys = reader.keys()
        shapes = {k: reader.shape(k) for k in keys}
        dtypes = {k: str(reader.dtype(k)).removeprefix("torch.") for k in keys}
        shards: dict[str, dict[str, int]] = {}
        for k in keys:
            n = 1
            for d in shapes[k]:
                n *= d
            entry = shards.setdefault(reader.file_of(k), {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += n * _DTYPE_BYTES.get(dtypes[k], 0)
    summary["expert_layout"] = _layout(keys)
    summary["shards"] = [{"file": f, **v} for f, v in sorted(shards.items())]
    summary["dtypes"] = dict(Counter(dtypes.values()))
    summary["tensors"] = len(keys)
    summary["total_bytes"] = sum(v["bytes"] for v in shards.values())
    summary["sample"] = [(k, shapes[k], dtypes[k]) for k in sorted(keys)[:12]]
    return summary


def _layout(keys: list[str]) -> str:
    if any(".experts.0." in k or ".experts.expert_0." in k for k in keys):
        return "split (per-expert 2-D)"
    if any(k.endswith(("gate_up_proj", "input_linear.weight")) for k in keys):
        return "fused (3-D experts)"
    if any("_EDF" in k or "_EFD" in k for k in keys):
        return "moekit (3-D experts)"
    return "no experts found"
