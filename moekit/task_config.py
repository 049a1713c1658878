"""A non-language task's config from the shared command-line flags and `--set FIELD=VALUE`.

`moekit/tasks.py` adds the flags and hands `--task vision|multitask` to its package; each package's
CLI builds its config here, so the flags and the packages do not import each other.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from typing import Any

# A flag of the language-model commands -> the field of the task config it sets, where they differ.
RENAMED = {"active_d_ff": "d_ff"}


def parse_value(text: str, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {name}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        return type(default)(text) if default is not None else text
    except ValueError:
        raise ValueError(f"--set {name}={text!r}: expected a {type(default).__name__}") from None


def task_config(cls: type, args: argparse.Namespace, shared_flags: list[str]):
    """`cls()` with the shared flags the user gave (by field name) and every `--set FIELD=VALUE`."""
    defaults = cls()
    names = {f.name for f in fields(cls)}
    changes: dict[str, Any] = {}
    for flag in shared_flags:
        value = getattr(args, flag, None)
        if value is None or value is False:
            continue
        field_name = RENAMED.get(flag, flag)
        if field_name not in names:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --task {args.task}; its settings "
                             f"are {sorted(names)} (use --set FIELD=VALUE)")
        changes[field_name] = value
    for item in args.task_set:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(names)}")
        changes[name] = parse_value(text, getattr(defaults, name), name)
    return replace(defaults, **changes)
