"""`from_pretrained`: every checkpoint directory moekit writes (or reads) -> a model.

Hugging Face directories (config.json + safetensors, through the family's rules), moekit's native
format (moekit_config.json, see `moekit.hf.native`) and a training run's `final/` (one of the two).
Loading builds the model on the meta device, allocates it once, and fills it tensor by tensor from
the memory-mapped shards, so peak memory is about one copy of the weights, not two.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from moekit.hf.convert import checkpoint_to_model
from moekit.hf.families import family
from moekit.hf.io import CONFIG_FILE, CheckpointReader, read_config
from moekit.hf.native import is_native, read_native
from moekit.hf.rules import Rule
from moekit.hf.save import tied_copies
from moekit.model.config import ModelConfig
from moekit.model.encoder_decoder import SwitchConfig, SwitchTransformer
from moekit.model.transformer import MoETransformer

Model = MoETransformer | SwitchTransformer
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> Model:
    """Load a checkpoint directory as a MoETransformer (SwitchTransformer for switch_transformers).

    Args:
        path: a Hugging Face directory (config.json and model.safetensors, or an index and its
            shards, in the per-expert or the fused 3-D expert layout), a native moekit directory
            (moekit_config.json), or a training run's `final/` folder.
        dtype: parameter dtype (default: config.json's dtype, else float32).
        device: where the parameters are allocated.
    Returns:
        The model in eval mode, with `hf_config` (the config.json dict, if any) attached for saving.
    Raises:
        ValueError / FileNotFoundError naming the file and tensor for unsupported model types,
        missing shards, corrupted files, unmapped keys and shapes that contradict config.json.
    """
    path = Path(path)
    if is_native(path):
        meta = read_native(path)
        if meta.quantize is not None:
            raise ValueError(f"{path} holds quantized weights ({meta.quantize.get('method')}); load it with "
                             f"moekit.from_pretrained, which reads them")
        model = load_weights(meta.config, path, (), dtype=resolve_dtype(dtype, {"dtype": meta.dtype}),
                             device=device, name=str(path / "moekit_config.json"))
        if meta.hf_config:
            model.hf_config = meta.hf_config  # type: ignore[attr-defined]
        return model
    if not (path / CONFIG_FILE).is_file() and (path / "final").is_dir():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; this looks like a training run folder, whose "
                                f"final weights are in {path / 'final'}")
    hf_config = read_config(path)
    file = path / CONFIG_FILE
    fam = family(hf_config.get("model_type"), where=str(file))
    quant = hf_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(f"{file}: quantized checkpoint (quant_method={method!r}); "
                         f"moekit loads float weights only, so dequantize it first (e.g. to bfloat16)")
    config = fam.config_from_hf(hf_config, source=str(file))
    model = load_weights(config, path, fam.load_rules(), dtype=resolve_dtype(dtype, hf_config),
                         device=device, name=f"model_type={fam.model_type!r}",
                         ignore=fam.ignored_keys(hf_config))
    model.hf_config = hf_config  # type: ignore[attr-defined]
    return model


def build(config: ModelConfig | SwitchConfig) -> Model:
    return SwitchTransformer(config) if isinstance(config, SwitchConfig) else MoETransformer(config)


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


