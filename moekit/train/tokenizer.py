"""Byte-level BPE tokenizer (GPT-2 style) trained with the `tokenizers` library on the training split.

Byte-level means every UTF-8 string encodes without unknown tokens; the tokenizer is saved as
`tokenizer.json` beside the model and loaded back with `load_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # the 256 byte symbols + the end-of-text token


def check_vocab_size(vocab_size: object, what: str = "vocab_size") -> None:
    """Refuse a BPE vocabulary smaller than the byte alphabet plus the end-of-text token."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"{what} {vocab_size!r} is invalid: must be an integer >= {MIN_VOCAB_SIZE} "
                         f"(256 bytes + the end-of-text token)")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (including `<|endoftext|>`, id 0)."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; train it with train_tokenizer")
    return token_id


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write `folder/tokenizer.json` atomically (whole or not at all); an identical file is left as is."""
    from moekit.files import atomic_write

    path = Path(folder) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tokenizer.to_str(pretty=True).encode()
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write(path, data)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json` (or the file inside a folder); ValueError naming a damaged file."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for unreadable JSON
        raise ValueError(f"{path} is not a readable tokenizer ({err}); the file is truncated or damaged. "
                         f"Restore it, or delete it to train it again from the same corpus and "
                         f"--vocab-size (BPE training is deterministic, so a resumed run tokenizes alike)"
                         ) from err
