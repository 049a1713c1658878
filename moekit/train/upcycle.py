"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE from a trained dense model.

Every tensor the two models share is copied; each MoE layer's experts start as copies of that
layer's dense MLP (optionally with a little noise to break the symmetry); routers start fresh.
With exact copies and top-k weights that sum to 1, the MoE computes what the dense model did.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from moekit.train import checkpoint as ckpt

# dense MLP tensor (under `<layer>.mlp.`) -> expert tensor name, and whether to transpose:
# nn.Linear stores (out, in); experts store (E, in, out).
_GATED = {"gate_proj.weight": ("experts.w_gate_EDF", True), "up_proj.weight": ("experts.w_up_EDF", True),
          "down_proj.weight": ("experts.w_down_EFD", True), "gate_proj.bias": ("experts.b_gate_EF", False),
          "up_proj.bias": ("experts.b_up_EF", False), "down_proj.bias": ("experts.b_down_ED", False)}
_PLAIN = {"up_proj.weight": ("experts.w_in_EDF", True), "down_proj.weight": ("experts.w_out_EFD", True),
          "up_proj.bias": ("experts.b_in_EF", False), "down_proj.bias": ("experts.b_out_ED", False)}


def read_dense_tensors(path: str | Path) -> dict[str, Tensor]:
    """Model tensors of a run folder (newest checkpoint), a checkpoint folder or a final-model folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found, _ = ckpt.latest_checkpoint(path / "checkpoints")
        if found is None:
            raise ValueError(f"{path} has no complete checkpoint to upcycle from")
        path = found
    if (path / ckpt.MANIFEST).is_file():
        return ckpt.read_checkpoint(path)[0]["model"]
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    raise FileNotFoundError(f"--init-from {path}: expected a run folder, a checkpoint folder or a folder "
                            f"with model.safetensors")


@torch.no_grad()
def upcycle(model: nn.Module, dense: dict[str, Tensor], *, noise: float = 0.0, seed: int = 0) -> None:
    """Load `dense` weights into the MoE `model`, expanding each dense MLP into its layer's experts.

    Args:
        dense: the dense model's tensors by name (same architecture except the MoE feed-forwards).
        noise: std of Gaussian noise added to each expert copy, relative to the tensor's own std.
    Raises ValueError naming the tensors that do not fit (another architecture, or expert d_ff
    different from the dense d_ff), or for a noise that is not a finite number >= 0.
    """
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise={noise!r} is invalid: must be a finite number >= 0 (0 gives exact copies)")
    ours = ckpt.model_tensors(model)
    gen = torch.Generator().manual_seed(seed)
    copied: set[str] = set()
    problems: list[str] = []
    for name, src in dense.items():
        if name in ours and ours[name].shape == src.shape:
            ours[name].copy_(src)
            copied.add(name)
            continue
        prefix, _, leaf = name.partition(".mlp.")
        rules = _GATED if f"{prefix}.mlp.experts.w_gate_EDF" in ours else _PLAIN
        if not leaf or leaf not in rules or f"{prefix}.mlp.{rules[leaf][0]}" not in ours:
            problems.append(f"{name} {tuple(src.shape)} has no place in this model")
            continue
        target_name = f"{prefix}.mlp.{rules[leaf][0]}"
        target = ours[target_name]
        per_expert = src.t() if rules[leaf][1] else src
        if tuple(per_expert.shape) != tuple(target.shape[1:]):
            problems.append(f"{name} {tuple(src.shape)} does not fit {target_name} {tuple(target.shape)} "
                            f"(expert d_ff must equal the dense d_ff)")
            continue
        copies = per_expert.expand_as(target).clone()
        if noise > 0:
            copies += noise * per_expert.float().std() * torch.randn(target.shape, generator=gen)
        target.copy_(copies)
        copied.add(target_name)
    if problems:
        raise ValueError("the --init-from checkpoint is not a dense parent of this model: "
                         + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
    # Everything but routers and router buffers must have come from the parent.
    fresh = [n for n in ours if n not in copied and ".router." not in n and not n.endswith("load_counts_E")]
    if fresh:
        raise ValueError(f"the --init-from checkpoint lacks {fresh[:5]}; it is not a dense parent of this model")


def upcycle_from(model: nn.Module, path: str | Path, *, noise: float = 0.0, seed: int = 0) -> None:
    upcycle(model, read_dense_tensors(path), noise=noise, seed=seed)


def parent_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer.json that belongs to an --init-from folder (run, checkpoint or final), if any."""
    path = Path(path)
    candidates = [path / "tokenizer.json"]
    if (path / ckpt.MANIFEST).is_file():  # OUT/checkpoints/step_X: the run folder's tokenizer
        candidates.append(path.parent.parent / "tokenizer.json")
    return next((c for c in candidates if c.is_file()), None)


def check_parent_tokenizer(path: str | Path, tokenizer) -> None:
    """Refuse a parent trained with another tokenizer: its embedding rows would mean other tokens."""
    import json

    from moekit.train.tokenizer import load_tokenizer

    found = parent_tokenizer(path)
    if found is None:
        print(f"warning: --init-from {path} has no tokenizer.json beside it; the parent must have been "
              f"trained with this run's tokenizer, or its embeddings mean other tokens")
        return
    theirs = load_tokenizer(found)
    if json.loads(theirs.to_str()) != json.loads(tokenizer.to_str()):
        raise ValueError(f"--init-from {path} was trained with another tokenizer ({found}: "
                         f"{theirs.get_vocab_size()} tokens; this run's: {tokenizer.get_vocab_size()}), "
                         f"so its embedding rows stand for other tokens. Train with the parent's corpus "
                         f"and --vocab-size, or upcycle from a parent trained on this run's data")
