"""moekit.analysis."""
