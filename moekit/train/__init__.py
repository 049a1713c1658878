"""moekit.train."""
