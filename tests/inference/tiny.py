"""Tiny random Hugging Face checkpoints of every decoder family, saved with a character-level
tokenizer (tokenizer.json + tokenizer_config.json with a chat template), for generation tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors

from tests.hf.tiny import MODEL_TYPES, VOCAB, save_tiny

SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ012345:\n"
assert len(SPECIALS) + len(CHARS) == VOCAB
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a: {% endif %}")
DECODERS = [t for t in MODEL_TYPES]


def char_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def save_tokenizer(path: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> None:
    char_tokenizer().save(str(path / "tokenizer.json"))
    config: dict = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def save_tiny_with_tokenizer(model_type: str, path: Path, seed: int = 0, **overrides):
    """A tiny random model of `model_type` and its tokenizer in `path`; returns the transformers model."""
    model = save_tiny(model_type, path, {**IDS, "seed": seed, **overrides})
    save_tokenizer(path)
    return model
