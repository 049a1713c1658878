"""`from_pretrained` / `save_pretrained`: Hugging Face checkpoint directories <-> MoETransformer.

Loading builds the model on the meta device, allocates it once, and fills it tensor by tensor from
the memory-mapped shards, so peak memory is about one copy of the weights, not two. Saving writes
config.json (transformers' field names) and safetensors shards with the family's expert layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moekit.hf.configs import TO_HF, TO_MOEKIT
from moekit.hf.convert import checkpoint_to_model, model_to_checkpoint
from moekit.hf.expressible import differences
from moekit.hf.families import FAMILIES, Layout, family, ignored_keys
from moekit.hf.io import CONFIG_FILE, CheckpointReader, read_config, write_checkpoint
from moekit.hf.rules import Rule
from moekit.model.config import ModelConfig
from moekit.model.encoder_decoder import SwitchConfig, SwitchTransformer
from moekit.model.transformer import MoETransformer

Model = MoETransformer | SwitchTransformer

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM", "phimoe": "PhimoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
    "jamba": "JambaForCausalLM", "dbrx": "DbrxForCausalLM",
    "switch_transformers": "SwitchTransformersForConditionalGeneration",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TIED_HEAD = "lm_head.weight"


def model_type_of(hf_config: dict, path: str | Path) -> str:
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: no 'model_type' field")
    if model_type not in FAMILIES or model_type not in TO_MOEKIT:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: model_type={model_type!r} is not supported; "
                         f"moekit reads {sorted(set(FAMILIES) & set(TO_MOEKIT))}")
    return model_type


def resolve_dtype(dtype: torch.dtype | str | None, hf_config: dict) -> torch.dtype:
    """The load dtype: as given, else config.json's `dtype` / `torch_dtype`, else float32."""
    if dtype is None:
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid: must be one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or its name, not {dtype!r}")
    return dtype


def from_pretrained(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
    offload_experts: bool = False, expert_cache: int | str | None = None, quantize: str | None = None,
    **offload_options: Any,
) -> Model:
    """Load a Hugging Face checkpoint directory as a MoETransformer (SwitchTransformer for
    model_type switch_transformers).

    Args:
        path: directory with config.json and model.safetensors (or an index and its shards), in
            the per-expert or the fused 3-D expert layout.
        dtype: parameter dtype (default: config.json's dtype, else float32).
        device: where the parameters are allocated.
        offload_experts, expert_cache: keep routed experts in the files and read them on demand
            into a cache of at most `expert_cache` bytes (see moekit.inference.offload; further
            options such as policy= and prefetch= are OffloadConfig's fields).
        quantize: "int8" or "int4" weight-only quantized experts (see moekit.inference.quant).
    Returns:
        The model in eval mode, with `hf_config` (the config.json dict) attached for saving.
    Raises:
        ValueError / FileNotFoundError naming the file and tensor for unsupported model types,
        missing shards, corrupted files, unmapped keys and shapes that contradict config.json.
    """
    if offload_experts or quantize is not None or expert_cache is not None or offload_options:
        from moekit.inference.offload import load_with_options  # local: moekit.inference imports this module

        return load_with_options(path, dtype=dtype, device=device, offload_experts=offload_experts,
                                 expert_cache=expert_cache, quantize=quantize, **offload_options)
    hf_config = read_config(path)
    model_type = model_type_of(hf_config, path)
    quant = hf_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(f"{Path(path) / CONFIG_FILE}: quantized checkpoint (quant_method={method!r}); "
                         f"moekit loads float weights only, so dequantize it first (e.g. to bfloat16)")
    config = TO_MOEKIT[model_type](hf_config)
    model = load_weights(config, path, family(model_type).load_rules(), dtype=resolve_dtype(dtype, hf_config),
                         device=device, name=f"model_type={model_type!r}",
                         ignore=ignored_keys(model_type, hf_config))
    model.hf_config = hf_config  # type: ignore[attr-defined]
    return model


def build(config: ModelConfig | SwitchConfig) -> Model:
    return SwitchTransformer(config) if isinstance(config, SwitchConfig) else MoETransformer(config)


def tied_copies(config: ModelConfig | SwitchConfig) -> dict[str, str]:
    """Checkpoint keys that are copies of another tensor in moekit (hidden key -> source key)."""
    if isinstance(config, SwitchConfig):
        copies = {f"{s}.embed_tokens.weight": "shared.weight" for s in ("encoder", "decoder")}
        return {**copies, TIED_HEAD: "shared.weight"} if config.tie_word_embeddings else copies
    return {TIED_HEAD: "model.embed_tokens.weight"} if config.tie_embeddings else {}


def load_weights(config: ModelConfig | SwitchConfig, path: str | Path, rules: tuple[Rule, ...], *,
                 dtype: torch.dtype, device: str | torch.device, name: str,
                 ignore: re.Pattern | None = None) -> Model:
    """Build `config` on the meta device, allocate it once, fill it tensor by tensor from `path`.

    Checkpoint keys fully matching `ignore` are skipped; tied copies are checked, not loaded.
    """
    with CheckpointReader(path) as reader:
        with torch.device("meta"):
            model = build(config)
        model = _to_empty(model.to(dtype), device)
        state = model.state_dict(keep_vars=True)
        copies = tied_copies(config)
        shapes = {k: tuple(v.shape) for k, v in state.items() if k not in copies}
        where = lambda key: f"{key} in {reader.path / reader.file_of(key)}" if key in reader else key
        with torch.no_grad():
            view = _Without(reader, set(copies), ignore)
            for key, tensor in checkpoint_to_model(rules, view, shapes, where=where, name=name):
                state[key].copy_(tensor)
            _zero_runtime_buffers(model)
        for copy, source in copies.items():
            # a tied copy a checkpoint stores anyway must equal its source: moekit keeps one tensor
            if copy in reader and not torch.equal(reader.get(copy).to(dtype), state[source].detach()):
                raise ValueError(f"{where(copy)} differs from {source}, but config.json ties them (moekit "
                                 f"keeps one tensor); fix tie_word_embeddings in config.json")
    return model.eval()


def _to_empty(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """`module.to_empty`, keeping tied parameters tied (to_empty gives each its own storage)."""
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model = model.to_empty(device=device)
    for names in shared.values():
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    return model


class _Without:
    """A checkpoint view that hides some keys (tied copies, and keys matching `ignore`)."""

    def __init__(self, reader: CheckpointReader, hidden: set[str], ignore: re.Pattern | None = None) -> None:
        self.reader, self.hidden, self.ignore = reader, hidden, ignore

    def keys(self) -> list[str]:
        return [k for k in self.reader.keys()
                if k not in self.hidden and not (self.ignore is not None and self.ignore.fullmatch(k))]

    def get(self, key: str) -> torch.Tensor:
        return self.reader.get(key)


def _zero_runtime_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers are runtime counters (e.g. MoELayer.load_counts_E) that start at 0."""
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = getattr(module, name)
            if buffer is not None:
                buffer.zero_()


def hf_config_for(model: Model, model_type: str) -> dict[str, Any]:
    """config.json for `model`: the loaded config.json (if any) updated with the translated fields."""
    base = dict(getattr(model, "hf_config", None) or {})
    if base.get("model_type", model_type) != model_type:
        base = {}
    dtype = next(model.parameters()).dtype
    base.pop("torch_dtype", None)  # the older name of "dtype"
    out = {**base, **TO_HF[model_type](model.config), "model_type": model_type,
           "dtype": str(dtype).removeprefix("torch.")}
    out.setdefault("architectures", [ARCHITECTURES[model_type]])
    return out


def save_pretrained(
    model: Model,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    layout: Layout = "split",
    model_type: str | None = None,
) -> list[str]:
    """Write `model` as a Hugging Face checkpoint directory transformers can load.

    Args:
        layout: "split" writes what transformers' save_pretrained writes (per-expert 2-D weights
            for most families); "fused" writes transformers' 3-D expert tensors.
        model_type: the family to write; defaults to the model_type the model was loaded from.
    Returns:
        The files written.
    """
    if model_type is None:
        model_type = (getattr(model, "hf_config", None) or {}).get("model_type")
        if model_type is None:
            raise ValueError(f"save_pretrained needs model_type= (one of {sorted(TO_HF)}) for a model "
                             f"not loaded from a Hugging Face checkpoint")
    if model_type not in TO_HF:
        raise ValueError(f"model_type={model_type!r} is not supported; moekit writes {sorted(TO_HF)}")
    copies = tied_copies(model.config)  # transformers re-ties these from their source
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in copies}
    tensors = model_to_checkpoint(family(model_type).save_rules(layout), state)
    config = hf_config_for(model, model_type)
    if isinstance(model.config, ModelConfig):
        diffs = differences(model.config, TO_MOEKIT[model_type](config))  # type: ignore[arg-type]
        if diffs:
            raise ValueError(f"this model cannot be written as model_type={model_type!r}; its config.json "
                             f"would describe a different model: {'; '.join(diffs)}")
    out = Path(path)
    files = write_checkpoint(out, tensors, max_shard_size=max_shard_size)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [*files, CONFIG_FILE]


# ---- moekit's own layout: moekit_config.json + safetensors under moekit's parameter names ------
MOEKIT_CONFIG = "moekit_config.json"


def save_moekit(model: Model, path: str | Path, *, max_shard_size: int | str = "5GB") -> list[str]:
    """Write `model` under its own parameter names (3-D experts) with its ModelConfig.

    The config.json it was loaded from (if any) is kept, so the directory converts back to the
    Hugging Face layout later.
    """
    copies = tied_copies(model.config)
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in copies}
    files = write_checkpoint(path, state, max_shard_size=max_shard_size)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    kind = "switch" if isinstance(model.config, SwitchConfig) else "decoder"
    meta = {"model": asdict(model.config), "kind": kind, "dtype": dtype,
            "hf_config": getattr(model, "hf_config", None)}
    (Path(path) / MOEKIT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return [*files, MOEKIT_CONFIG]


def moekit_config(meta: dict) -> ModelConfig | SwitchConfig:
    if meta.get("kind") == "switch":
        return SwitchConfig(**meta["model"])
    return ModelConfig.from_dict(meta["model"])


def load_moekit(path: str | Path, *, dtype: torch.dtype | str | None = None,
                device: str | torch.device = "cpu") -> Model:
    """Load a directory written by `save_moekit` (no rules: every key is a parameter name)."""
    file = Path(path) / MOEKIT_CONFIG
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no {MOEKIT_CONFIG}; not a moekit-layout checkpoint") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    config = moekit_config(meta)
    model = load_weights(config, path, (), dtype=resolve_dtype(dtype, meta), device=device, name=str(file))
    if meta.get("hf_config"):
        model.hf_config = meta["hf_config"]  # type: ignore[attr-defined]
    return model
