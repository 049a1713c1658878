"""Shared test settings: deterministic, small, CPU."""

import torch

torch.use_deterministic_algorithms(False)
