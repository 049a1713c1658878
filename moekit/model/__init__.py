"""moekit.model."""
