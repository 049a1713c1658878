"""`save_pretrained`: a moekit model -> a Hugging Face checkpoint directory transformers can load.

It writes config.json (transformers' field names, from the family's `to_hf`) and safetensors shards
in the family's expert layout, into a new or empty directory (`overwrite=True` replaces an earlier
checkpoint's files and nothing else). It works on any built model and never imports the model
classes, so `MoETransformer.save_pretrained` can call it without an import circle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from moekit.hf.convert import model_to_checkpoint
from moekit.hf.expressible import differences
from moekit.hf.families import FAMILIES, family
from moekit.hf.family import Layout
from moekit.hf.io import CONFIG_FILE, prepare_destination, write_checkpoint
from moekit.model.config import ModelConfig
from moekit.model.encoder_decoder import SwitchConfig

TIED_HEAD = "lm_head.weight"


def tied_copies(config: ModelConfig | SwitchConfig) -> dict[str, str]:
    """Checkpoint keys that are copies of another tensor in moekit (hidden key -> source key)."""
    if isinstance(config, SwitchConfig):
        copies = {f"{s}.embed_tokens.weight": "shared.weight" for s in ("encoder", "decoder")}
        return {**copies, TIED_HEAD: "shared.weight"} if config.tie_word_embeddings else copies
    return {TIED_HEAD: "model.embed_tokens.weight"} if config.tie_embeddings else {}


def dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def hf_config_for(model: nn.Module, model_type: str) -> dict[str, Any]:
    """config.json for `model`: the loaded config.json (if any) updated with the translated fields."""
    fam = family(model_type)
    base = dict(getattr(model, "hf_config", None) or {})
    if base.get("model_type", model_type) != model_type:
        base = {}
    base.pop("torch_dtype", None)  # the older name of "dtype"
    out = {**base, **fam.to_hf(model.config), "model_type": model_type, "dtype": dtype_name(model)}
    out.setdefault("architectures", [fam.architecture])
    return out


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    layout: Layout = "split",
    model_type: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write `model` (a MoETransformer or SwitchTransformer) as a Hugging Face checkpoint directory.

    Args:
        layout: "split" writes what transformers' save_pretrained writes (per-expert 2-D weights
            for most families); "fused" writes transformers' 3-D expert tensors.
        model_type: the family to write; defaults to the model_type the model was loaded from.
        overwrite: replace the checkpoint files (weights, index, config.json, moekit_config.json)
            of a non-empty `path`; without it a non-empty `path` is refused. Other files stay.
    Returns:
        The files written.
    Raises:
        ValueError when the model cannot be written as `model_type` (checked before anything is
        written) or `path` is not a new or empty directory.
    """
    if model_type is None:
        model_type = (getattr(model, "hf_config", None) or {}).get("model_type")
        if model_type is None:
            raise ValueError(f"save_pretrained needs model_type= (one of {sorted(FAMILIES)}) for a model "
                             f"not loaded from a Hugging Face checkpoint")
    fam = family(model_type)
    fam.check_writes(model.config)
    copies = tied_copies(model.config)  # transformers re-ties these from their source
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in copies}
    tensors = model_to_checkpoint(fam.save_rules(layout), state)
    config = hf_config_for(model, model_type)
    if isinstance(model.config, ModelConfig):
        diffs = differences(model.config, fam.to_moekit(config))  # type: ignore[arg-type]
        if diffs:
            raise ValueError(f"this model cannot be written as model_type={model_type!r}; its config.json "
                             f"would describe a different model: {'; '.join(diffs)}")
    out = prepare_destination(path, overwrite=overwrite)
    files = write_checkpoint(out, tensors, max_shard_size=max_shard_size)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [*files, CONFIG_FILE]
