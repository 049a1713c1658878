"""moekit.inference."""
