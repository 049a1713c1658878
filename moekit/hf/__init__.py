"""Checkpoints: Hugging Face directories (declarative key-mapping rules per family, one engine) and
moekit's native format; `from_pretrained` reads both, `save_pretrained` / `save_native` write them."""

from moekit.hf.checkpoint import from_pretrained
from moekit.hf.native import save_native
from moekit.hf.save import save_pretrained

__all__ = ["from_pretrained", "save_native", "save_pretrained"]
