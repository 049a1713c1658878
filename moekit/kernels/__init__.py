"""Compiled CPU kernels with torch fallbacks (`moekit.kernels.cpu`)."""
