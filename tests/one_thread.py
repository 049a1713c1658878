"""An autouse fixture for test folders of tiny models: one intra-op thread per test. On a shared CPU,
thread hand-offs cost far more than these matmuls (10x in wall time here). Restored after each test,
so other test folders keep their setting; never set in library code. A folder's conftest.py imports it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
