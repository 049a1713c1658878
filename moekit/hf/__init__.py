"""Hugging Face checkpoints: `from_pretrained` / `save_pretrained` over declarative key-mapping rules."""

from moekit.hf.checkpoint import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
