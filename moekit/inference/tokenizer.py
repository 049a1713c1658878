"""The tokenizer beside the weights: `tokenizer.json` (the `tokenizers` library) plus the special
tokens and chat template of `tokenizer_config.json` (or `chat_template.jinja` / `chat_template.json`).

Chat templates are rendered as transformers renders them: a sandboxed Jinja2 environment with
trim_blocks and lstrip_blocks, the loop-controls extension, a `tojson` filter, `raise_exception`
and `strftime_now` globals, and the special tokens (`bos_token`, `eos_token`, ...) as variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# `moekit train` writes a byte-level BPE whose end-of-text token is this (moekit.train.tokenizer).
TRAIN_EOS = "<|endoftext|>"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class TextTokenizer:
    """Text <-> token ids, special tokens and the chat template of one model directory."""

    tokenizer: Tokenizer
    special: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    source: Path | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        """Load `path/tokenizer.json` and, when present, `tokenizer_config.json` and chat templates.

        Raises FileNotFoundError naming the directory when it has no tokenizer.json.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} has no {TOKENIZER_FILE}: moekit needs the tokenizer beside the weights (save it "
                f"with tokenizer.save_pretrained(dir) in transformers, or train with `moekit train`)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises its own Exception type on a malformed file
            raise ValueError(f"{file} is not a valid tokenizers file: {err}") from err
        config: dict = {}
        config_file = path / TOKENIZER_CONFIG
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_file} is not valid JSON: {err}") from err
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
        special = {name: text for name in SPECIAL_NAMES
                   if (text := _token_text(config.get(name))) is not None}
        if "eos_token" not in special and tokenizer.token_to_id(TRAIN_EOS) is not None:
            special["eos_token"] = TRAIN_EOS  # a `moekit train` run folder: no tokenizer_config.json
        return cls(tokenizer=tokenizer, special=special, chat_template=_find_template(path, config),
                   source=path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int | None:
        """The id of special token `name` ("eos_token", ...), or None when it has none."""
        text = self.special.get(name)
        return None if text is None else self.tokenizer.token_to_id(text)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text for a conversation (a list of {"role", "content"} messages)."""
        if self.chat_template is None:
            raise ValueError(f"{self.source or 'this tokenizer'} has no chat template ('chat_template' in "
                             f"{TOKENIZER_CONFIG}, or chat_template.jinja): send a plain prompt instead")
        check_messages(messages)
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **self.special, **kwargs)


def check_messages(messages: Any) -> None:
    """A conversation is a non-empty list of {"role": str, "content": str} objects."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'; got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string; got {type(m.get('content')).__name__}")


def _find_template(path: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list of named ones: "default"), else
    chat_template.jinja, else chat_template.json (transformers writes either, by version)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if isinstance(template, str):
        return template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        data = json.loads((path / "chat_template.json").read_text())
        if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
            return data["chat_template"]
    return None


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool,
                         **variables: Any) -> str:
    """Render a chat template with transformers' Jinja2 setup (sandboxed: templates run no Python)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as err:
        raise ValueError(f"chat template failed: {err}") from err
