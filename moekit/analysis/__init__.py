"""moekit.analysis: routing statistics, specialization metrics, knock-out, pruning and pictures.

`analyze(model, batches, labels) -> Analysis` is the Python entry point; `moekit analyze` and
`moekit prune` call it.
"""

from moekit.analysis.analyze import Analysis, AnalysisConfig, analyze, analyze_trace, collect_trace
from moekit.analysis.trace import RoutingTrace

__all__ = ["Analysis", "AnalysisConfig", "RoutingTrace", "analyze", "analyze_trace", "collect_trace"]
