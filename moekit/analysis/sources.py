"""What `moekit analyze` / `moekit prune` can read: a model directory, a training run, or a trace.

    a Hugging Face directory (config.json + safetensors) or moekit's own layout (moekit_config.json);
    a run folder of `moekit train` (final/ and checkpoints/step_*) or one variant of `moekit
        compare` (runs/NAME, whose tokenizer.json sits two folders up);
    one checkpoint folder (checkpoints/step_*);
    a routing trace file (`moekit.analysis.trace`).
The tokenizer is the run's or the directory's tokenizer.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from moekit.analysis.trace import RoutingTrace


@dataclass
class Source:
    """A loaded PATH: the model (None for a trace), its tokenizer, the run's checkpoints (step, folder)."""

    path: Path
    kind: str
    model: nn.Module | None = None
    tokenizer: Tokenizer | None = None
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    trace: RoutingTrace | None = None


def load_model_dir(path: Path) -> nn.Module:
    """A Hugging Face directory or a native folder moekit wrote (`moekit.from_pretrained` reads both)."""
    import moekit

    if (path / "config.json").is_file() or (path / "moekit_config.json").is_file():
        return moekit.from_pretrained(path)
    raise FileNotFoundError(f"{path} holds no config.json or moekit_config.json; pass a model directory, "
                            f"a run folder of `moekit train`/`compare`, a checkpoint or a routing trace")


def load_checkpoint_model(folder: Path) -> nn.Module:
    """A training checkpoint's model, built from the config its state.json records."""
    from moekit.model import ModelConfig, MoETransformer
    from moekit.train.checkpoint import load_model_tensors, read_checkpoint

    tensors, state = read_checkpoint(folder)
    config = (state.get("run_info") or {}).get("model")
    if not isinstance(config, dict):
        raise ValueError(f"{folder / 'state.json'} records no model config (run_info.model); cannot rebuild "
                         f"the model of this checkpoint")
    model = MoETransformer(ModelConfig.from_dict(config))
    load_model_tensors(model, tensors["model"], source=f"checkpoint {folder}")
    return model.eval()


def run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    from moekit.train.checkpoint import list_checkpoints, verify_checkpoint

    found = [(int(p.name.split("_", 1)[1]), p) for p in list_checkpoints(run / "checkpoints")
             if verify_checkpoint(p) is None]
    return sorted(found)


def find_tokenizer(*folders: Path) -> Tokenizer | None:
    from moekit.train.tokenizer import load_tokenizer

    for folder in folders:
        if (folder / "tokenizer.json").is_file():
            return load_tokenizer(folder / "tokenizer.json")
    return None


def load_source(path: str | Path) -> Source:
    """Load PATH (see the module docstring); FileNotFoundError/ValueError say what was expected."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return Source(path, "trace", trace=RoutingTrace.load(path))
    if (path / "runs").is_dir() and not (path / "checkpoints").is_dir():
        names = sorted(p.name for p in (path / "runs").iterdir() if p.is_dir())
        raise ValueError(f"{path} is a `moekit compare` folder; analyze one of its variants: "
                         + ", ".join(str(path / "runs" / n) for n in names))
    if (path / "checkpoints").is_dir() or (path / "final").is_dir():
        checkpoints = run_checkpoints(path)
        if (path / "final").is_dir():
            model = load_model_dir(path / "final")
        elif checkpoints:
            model = load_checkpoint_model(checkpoints[-1][1])
        else:
            raise ValueError(f"run folder {path} has no final/ model and no complete checkpoint")
        tok = find_tokenizer(path, path / "final", path.parent.parent)
        return Source(path, "run", model=model.eval(), tokenizer=tok, checkpoints=checkpoints)
    if (path / "manifest.json").is_file() and (path / "state.json").is_file():
        tok = find_tokenizer(path.parent.parent, path.parent.parent.parent.parent)
        return Source(path, "checkpoint", model=load_checkpoint_model(path), tokenizer=tok)
    return Source(path, "model", model=load_model_dir(path).eval(), tokenizer=find_tokenizer(path))


@torch.no_grad()
def router_saturation(checkpoints: list[tuple[int, nn.Module]], final: nn.Module, batches: list) -> dict:
    """Per checkpoint and MoE layer, the mean overlap of each token's experts with the final model's
    experts for the same token (OLMoE's router saturation; 1 = the final routing already)."""
    from moekit.analysis.collect import collect_trace
    from moekit.analysis.metrics import topk_overlap

    reference = collect_trace(final, batches)
    steps, overlap = [], []
    for step, model in checkpoints:
        trace = collect_trace(model, batches)
        steps.append(step)
        overlap.append([topk_overlap(a.expert_ids_NK, b.expert_ids_NK, num_experts=b.num_experts)
                        for a, b in zip(trace.layers, reference.layers, strict=True)])
    return {"steps": steps, "overlap": overlap,
            "layers": [lt.layer for lt in reference.layers]}


def describe(source: Source) -> dict:
    info: dict = {"path": str(source.path), "kind": source.kind}
    model = source.model
    if model is not None and hasattr(model, "config"):
        cfg = model.config
        info["config"] = json.loads(json.dumps(cfg.to_dict())) if hasattr(cfg, "to_dict") else str(cfg)
    info["checkpoints"] = [step for step, _ in source.checkpoints]
    return info
