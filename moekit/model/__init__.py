"""moekit.model: decoder-only MoE transformers (attention, MLA, Mamba blocks) and their configs."""

from moekit.model.cache import KVCache
from moekit.model.config import LayerSpec, MLAConfig, ModelConfig, RopeConfig, layer_ids
from moekit.model.transformer import MoETransformer

__all__ = ["KVCache", "LayerSpec", "MLAConfig", "ModelConfig", "MoETransformer", "RopeConfig", "layer_ids"]
