"""A model directory ready to run: the decoder, its tokenizer and its end-of-sequence ids.

Accepts a Hugging Face directory (config.json + safetensors + tokenizer files), the `final/`
folder a `moekit train` run writes (weights, config and tokenizer.json), or the run folder itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.inference.tokenizer import TOKENIZER_FILE, TextTokenizer
from moekit.kernels import cpu as cpu_kernels
from moekit.model.linear import lm_head_layout
from moekit.model.transformer import MoETransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """What generation needs: model (eval mode), tokenizer, EOS ids and a display name."""

    model: MoETransformer
    tokenizer: TextTokenizer
    eos_ids: frozenset[int]
    name: str
    path: Path

    @property
    def context_length(self) -> int:
        return self.model.config.max_seq_len


def model_dir(path: str | Path) -> Path:
    """The directory holding the weights: `path`, or `path/final` for a `moekit train` run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a model directory (config.json + safetensors "
                                f"+ {TOKENIZER_FILE}) or a `moekit train` run folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file; give the directory that holds the model")
    if not (path / "config.json").is_file() and not (path / "moekit_config.json").is_file() \
            and (path / "final").is_dir():
        return path / "final"
    return path


def _config_eos(path: Path) -> set[int]:
    """eos_token_id of config.json and generation_config.json (an int or a list)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = path / name
        if not file.is_file():
            continue
        value = json.loads(file.read_text()).get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                ids.add(v)
    return ids


def load(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         name: str | None = None, **weights: Any) -> LoadedModel:
    """Load a model directory for generation (see the module docstring for what `path` may be).

    Args:
        dtype: "float32", "bfloat16" (or a torch dtype); default: the checkpoint's own.
        weights: `moekit.from_pretrained`'s offload / quantize options (offload_experts=True,
            expert_cache="2GB", quantize="int8", ...).
    Raises:
        FileNotFoundError when there is no model or no tokenizer.json; ValueError for an
        encoder-decoder or unsupported checkpoint.
    """
    folder = model_dir(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid: must be one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    tokenizer = TextTokenizer.from_dir(folder)  # before the weights: fail fast without a tokenizer
    if not ((folder / "config.json").is_file() or (folder / "moekit_config.json").is_file()):
        raise FileNotFoundError(f"{folder} has neither config.json nor moekit_config.json: not a model "
                                "directory")
    from moekit.load import from_pretrained

    model = from_pretrained(folder, dtype=dtype, device=device, **weights)
    if not isinstance(model, MoETransformer):
        raise ValueError(f"{folder} holds a {type(model).__name__}; generation runs decoder-only models")
    model.eval()
    if not cpu_kernels.available():
        lm_head_layout(model)  # the decode step's largest matrix, stored the way torch reads it fastest
    eos = _config_eos(folder)
    tok_eos = tokenizer.token_id("eos_token")
    if tok_eos is not None:
        eos.add(tok_eos)
    return LoadedModel(model=model, tokenizer=tokenizer, eos_ids=frozenset(eos), name=name or folder.name,
                       path=folder)
