"""moekit.parallel."""
