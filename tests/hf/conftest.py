"""tests/hf: tiny models only, so one intra-op thread: on a shared CPU, thread hand-offs cost more
than these matmuls (this sets the test process only, never library code)."""

import torch

torch.set_num_threads(1)
