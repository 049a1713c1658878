"""moekit.dispatch."""
