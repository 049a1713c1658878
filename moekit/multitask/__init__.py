"""Multi-task learning with multi-gate MoE (MMoE) and its baselines on Census-Income."""
