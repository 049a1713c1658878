"""moekit.experts."""
