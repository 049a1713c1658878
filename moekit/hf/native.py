"""moekit's native checkpoint format: the one module that writes and reads it.

A native directory holds safetensors under moekit's own parameter names (3-D expert weights; tied
copies stored once), sharded like a Hugging Face checkpoint, and `moekit_config.json`:

    {"format": "moekit", "format_version": 1, "kind": "decoder" | "switch",
     "config": <ModelConfig / SwitchConfig fields>, "dtype": "float32",
     "hf_config": <the config.json it was converted from, or null>,
     "quantize": <absent, or {"method": "int8" | "int4", ...}: weight-only quantized tensors, see
                  moekit.inference.quant, which writes and reads them through here>}

Training's final export (for a model without a Hugging Face family), `moekit convert --to moekit`
and `moekit.from_pretrained` all go through here. Files of the two layouts written before the
version key existed (`{"model": ..., "kind": ...}` from convert, a bare ModelConfig from training)
are still read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moekit.hf.io import NATIVE_FILE, prepare_destination, write_checkpoint
from moekit.hf.save import dtype_name, tied_copies
from moekit.model.config import ModelConfig
from moekit.model.encoder_decoder import SwitchConfig

FORMAT_VERSION = 1
_KINDS = {"decoder": ModelConfig, "switch": SwitchConfig}
_KEYS = ("format_version", "kind", "config", "dtype")


@dataclass(frozen=True)
class NativeMeta:
    """What `moekit_config.json` says: the model's config, its dtype, the config.json it came from."""

    config: ModelConfig | SwitchConfig
    dtype: str
    hf_config: dict | None = None
    quantize: dict | None = None


def is_native(path: str | Path) -> bool:
    return (Path(path) / NATIVE_FILE).is_file()


def save_native(model: nn.Module, path: str | Path, *, max_shard_size: int | str = "5GB",
                overwrite: bool = False, quantize: dict | None = None) -> list[str]:
    """Write `model` (its config as `model.config`) in the native format into a new or empty `path`.

    The config.json it was loaded from (`model.hf_config`, if any) is kept, so the directory
    converts back to the Hugging Face layout later. `overwrite` as in `prepare_destination`.
    `quantize` records how the tensors were quantized (moekit.inference.quant.save_quantized).
    Returns the files written.
    """
    config = model.config
    kind = next((k for k, cls in _KINDS.items() if isinstance(config, cls)), None)
    if kind is None:
        raise TypeError(f"save_native needs a model whose .config is a ModelConfig or SwitchConfig, "
                        f"not {type(config).__name__}")
    copies = tied_copies(config)
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in copies}
    out = prepare_destination(path, overwrite=overwrite)
    files = write_checkpoint(out, state, max_shard_size=max_shard_size)
    meta = {"format": "moekit", "format_version": FORMAT_VERSION, "kind": kind, "config": asdict(config),
            "dtype": dtype_name(model), "hf_config": getattr(model, "hf_config", None)}
    if quantize is not None:
        meta["quantize"] = quantize
    (out / NATIVE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return [*files, NATIVE_FILE]


def read_native(path: str | Path) -> NativeMeta:
    """Read and check `moekit_config.json` of a native directory.

    Raises FileNotFoundError if there is none, ValueError naming the file and the key for anything
    malformed (not JSON, missing keys, a newer format_version, a config that does not validate).
    """
    file = Path(path) / NATIVE_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no {NATIVE_FILE}; not a moekit-format checkpoint") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object, found {type(meta).__name__}")
    meta = _upgrade(meta, file)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{file}: format_version={version!r} is invalid: must be an integer >= 1")
    if version > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version={version} was written by a newer moekit; this one reads "
                         f"format_version <= {FORMAT_VERSION}, so upgrade moekit")
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise ValueError(f"{file}: missing key(s) {missing}; a moekit_config.json holds {list(_KEYS)}")
    kind, fields, dtype, hf_config = meta["kind"], meta["config"], meta["dtype"], meta.get("hf_config")
    if kind not in _KINDS:
        raise ValueError(f"{file}: kind={kind!r} is invalid: must be one of {sorted(_KINDS)}")
    if not isinstance(fields, dict):
        raise ValueError(f"{file}: config must be a JSON object of {_KINDS[kind].__name__} fields")
    if not isinstance(dtype, str):
        raise ValueError(f"{file}: dtype={dtype!r} must be a dtype name such as 'float32'")
    if hf_config is not None and not isinstance(hf_config, dict):
        raise ValueError(f"{file}: hf_config must be a JSON object or null")
    quantize = meta.get("quantize")
    if quantize is not None and not isinstance(quantize, dict):
        raise ValueError(f"{file}: quantize must be a JSON object (its method and group size) or absent")
    try:
        config = ModelConfig.from_dict(fields) if kind == "decoder" else SwitchConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: config does not describe a valid {_KINDS[kind].__name__}: {err}") from err
    return NativeMeta(config=config, dtype=dtype, hf_config=hf_config, quantize=quantize)


def _upgrade(meta: dict[str, Any], file: Path) -> dict[str, Any]:
    """The two layouts from before `format_version`, as version 1."""
    if "format_version" in meta:
        return meta
    if "model" in meta and "kind" in meta:  # convert's old layout
        return {"format_version": 1, "kind": meta["kind"], "config": meta["model"],
                "dtype": meta.get("dtype", "float32"), "hf_config": meta.get("hf_config")}
    if "vocab_size" in meta and "d_model" in meta:  # training's old layout: a bare ModelConfig
        return {"format_version": 1, "kind": "decoder", "config": meta, "dtype": "float32", "hf_config": None}
    raise ValueError(f"{file}: no format_version and not an older moekit layout either; a "
                     f"moekit_config.json holds {list(_KEYS)}")
