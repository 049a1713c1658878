"""From a corpus to a trained model folder: tokenizer, packed data, model, final weights.

`prepare_data` trains the tokenizer on the training split (or reuses `tokenizer.json` in the run
folder, so a resumed run tokenizes identically) and packs both splits. `save_final` writes the
trained weights in the Hugging Face layout when `moekit.hf` provides it, else safetensors + JSON.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from moekit.files import chmod_like_open
from moekit.model.config import ModelConfig
from moekit.train.batches import PackedSequences, encode_documents
from moekit.train.data import Corpus, load_corpus
from moekit.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

NATIVE_CONFIG = "moekit_config.json"
INIT_STD = 0.02  # MoETransformer.reset_parameters' std for every nn.Linear


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
    model = MoETransformer(config)
    match_expert_init(model)
    return model.to(device)


@torch.no_grad()
def match_expert_init(model: nn.Module, std: float = INIT_STD) -> None:
    """Draw routed-expert weights like every other matrix of the model, normal(0, std).

    `MoETransformer.reset_parameters` gives each nn.Linear (dense MLPs, shared experts, attention)
    std 0.02, while 3-D expert weights keep their own 1/sqrt(fan_in) init, 3-4x larger at small
    d_model. A dense-vs-MoE comparison must not hinge on that, so experts start like dense MLPs.
    """
    from moekit.train.trainer import moe_layers

    for layer in moe_layers(model):
        for name, p in layer.experts.named_parameters():
            if name.startswith("w_"):
                nn.init.normal_(p, std=std)


def save_final(model: nn.Module, config: ModelConfig, tokenizer: Tokenizer, folder: str | Path, *,
               model_type: str | None = None) -> Path:
    """Final weights + config + tokenizer.json in `folder`.

    With a `model_type` (a Hugging Face family), `model.save_pretrained` writes the Hugging Face
    layout, which is then loaded back and checked to give the same logits; otherwise (or if that
    check fails) the weights go to model.safetensors beside moekit_config.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model_type is not None and _save_hf_checked(model, folder, model_type):
        save_tokenizer(tokenizer, folder)
        return folder
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    chmod_like_open(folder / "model.safetensors")  # save_file makes it 0600; follow the umask
    config.save(folder / NATIVE_CONFIG)
    save_tokenizer(tokenizer, folder)
    return folder


def _save_hf_checked(model: nn.Module, folder: Path, model_type: str) -> bool:
    """save_pretrained into `folder` and verify by reloading; on any mismatch remove it, return False."""
    import moekit

    staging = folder / ".hf-staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, model_type=model_type)
        reloaded = moekit.from_pretrained(staging)
        tokens_BS = torch.arange(min(8, model.config.vocab_size))[None].to(next(model.parameters()).device)
        with torch.no_grad():
            was_training = model.training
            model.eval()
            same = torch.equal(model(tokens_BS).logits, reloaded.to(tokens_BS.device).eval()(tokens_BS).logits)
            model.train(was_training)
    except (ValueError, KeyError, RuntimeError) as err:
        print(f"note: Hugging Face layout ({model_type}) not written: {err}")
        same = False
    else:
        if not same:
            print(f"note: Hugging Face layout ({model_type}) did not reload to the same logits; "
                  f"writing moekit's own layout instead")
    if same:
        for f in staging.iterdir():
            f.replace(folder / f.name)
    shutil.rmtree(staging, ignore_errors=True)
    return same


def load_final(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Load weights saved by `save_final` (either layout)."""
    folder = Path(folder)
    if (folder / NATIVE_CONFIG).is_file():
        from moekit.model import MoETransformer

        config = ModelConfig.from_dict(json.loads((folder / NATIVE_CONFIG).read_text()))
        model = MoETransformer(config)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(device), config
    import moekit

    model = moekit.from_pretrained(folder)
    return model.to(device), model.config
