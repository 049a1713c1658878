"""`moekit.catalog`: the named MoE architectures (re-exported from moekit.model.catalog)."""

from moekit.model.catalog import PRESETS, Preset, get, names, scale_config, scale_moe

__all__ = ["PRESETS", "Preset", "get", "names", "scale_config", "scale_moe"]
