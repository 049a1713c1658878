"""From a corpus to a trained model folder: tokenizer, packed data, model, final weights.

`prepare_data` trains the tokenizer on the training split (or reuses `tokenizer.json` in the run
folder, so a resumed run tokenizes identically) and packs both splits. `save_final` writes the
trained weights in the Hugging Face layout when the preset has a family, else in moekit's native
format (`moekit.hf.native`); `moekit.from_pretrained` opens either.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from moekit.model.config import ModelConfig
from moekit.train.batches import PackedSequences, encode_documents
from moekit.train.data import Corpus, load_corpus
from moekit.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train: PackedSequences
    val: PackedSequences
    corpus: Corpus


def prepare_data(
    corpus_path: str | Path | None, *, seq_len: int, vocab_size: int, out_dir: str | Path | None = None,
    cache_dir: Path | None = None,
) -> PreparedData:
    """Load the corpus, train (or reuse) the tokenizer, and pack train and validation splits."""
    corpus = load_corpus(corpus_path, cache_dir=cache_dir)
    existing = Path(out_dir) / "tokenizer.json" if out_dir is not None else None
    if existing is not None and existing.is_file():
        tokenizer = load_tokenizer(existing)
        if tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(f"{existing} has {tokenizer.get_vocab_size()} tokens but --vocab-size is "
                             f"{vocab_size}; use the run's vocab size or a new --out")
    else:
        tokenizer = train_tokenizer((d.text for d in corpus.train), vocab_size=vocab_size)
    train = PackedSequences(tokens_N=encode_documents(tokenizer, corpus.train), seq_len=seq_len)
    val = PackedSequences(tokens_N=encode_documents(tokenizer, corpus.val), seq_len=seq_len)
    return PreparedData(tokenizer, train, val, corpus)


def config_json(config: ModelConfig) -> dict:
    """The config as plain JSON data (tuples become lists), for comparing with a saved one."""
    return json.loads(json.dumps(config.to_dict()))


def build_model(config: ModelConfig, *, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """A freshly initialised MoETransformer; the global RNG is seeded first, so init is reproducible."""
    from moekit.model import MoETransformer

    torch.manual_seed(seed)
    return MoETransformer(config).to(device)  # moekit.model.init's policy


FINAL_FILES = ("tokenizer.json",)  # what the final export writes besides the checkpoint itself


def check_final(folder: str | Path, *, overwrite: bool = False) -> None:
    """Refuse, before training starts, a `final/` folder that `save_final` would refuse afterwards
    (or a run folder that is a file)."""
    from moekit.hf.io import check_not_a_file

    folder = check_not_a_file(folder, "--out")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        more = f" and {len(entries) - 8} more" if len(entries) > 8 else ""
        raise ValueError(f"{folder} already holds {', '.join(entries[:8])}{more}; a new run writes its final "
                         f"weights there, so pass --resume to continue that run or choose a new --out "
                         f"(nothing was changed)")


def save_final(model: nn.Module, config: ModelConfig, tokenizer: Tokenizer, folder: str | Path, *,
               model_type: str | None = None, overwrite: bool = False) -> Path:
    """Final weights + config + tokenizer.json in `folder` (new or empty, unless `overwrite`, which
    replaces an earlier export's files there and nothing else).

    With a `model_type` (a Hugging Face family) the weights are written in the Hugging Face layout
    and checked by reloading them to the same logits; a model that has a family exports or fails
    loudly: if it cannot be written as that family (ValueError) or does not reload to the same
    logits (RuntimeError), the weights are written in moekit's native format instead, so nothing is
    lost, and the error is raised. Without a `model_type`, the native format (`moekit.hf.native`).
    Either layout loads with `moekit.from_pretrained(folder)`. `config` is the model's own
    (`model.config`), which is what the files record.
    """
    from moekit.hf.io import prepare_destination
    from moekit.hf.native import save_native

    folder = prepare_destination(folder, overwrite=overwrite, also=FINAL_FILES)
    # `folder` now holds nothing of an earlier export, so the writers below may fill it
    try:
        if model_type is not None:
            _save_hf_checked(model, folder, model_type)
    except Exception as err:
        save_native(model, folder, overwrite=True)
        save_tokenizer(tokenizer, folder)
        if isinstance(err, ValueError):
            raise ValueError(f"the final weights cannot be written as Hugging Face model_type={model_type!r}: "
                             f"{err}. They were written in moekit's native format to {folder} instead "
                             f"(moekit.from_pretrained reads it)") from err
        raise
    if model_type is None:
        save_native(model, folder, overwrite=True)
    save_tokenizer(tokenizer, folder)
    return folder


def _save_hf_checked(model: nn.Module, folder: Path, model_type: str) -> None:
    """save_pretrained into a staging folder inside `folder`, reload it, compare the logits, and only
    then move the files into `folder`. ValueError if the model has no such layout; RuntimeError if
    it reloads to other logits (a moekit defect)."""
    from moekit.hf.checkpoint import from_pretrained

    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".hf-staging-"))
    try:
        files = model.save_pretrained(staging, model_type=model_type)
        reloaded = from_pretrained(staging)
        tokens_BS = torch.arange(min(8, model.config.vocab_size))[None].to(next(model.parameters()).device)
        was_training = model.training
        with torch.no_grad():
            model.eval()
            same = torch.equal(model(tokens_BS).logits, reloaded.to(tokens_BS.device).eval()(tokens_BS).logits)
        model.train(was_training)
        if not same:
            raise RuntimeError(f"the Hugging Face layout (model_type={model_type!r}) of the final weights "
                               f"reloads to different logits; this is a moekit defect, please report it")
        for name in files:
            (staging / name).replace(folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_final(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Load weights saved by `save_final` (either layout); `moekit.from_pretrained` does the same."""
    from moekit.hf.checkpoint import from_pretrained

    model = from_pretrained(folder)
    return model.to(device), model.config
