"""Expert parallelism over spawned gloo ranks equals one process (see workers.py for the checks).

Per mesh: dispatch-then-combine with identity experts returns the input and its gradients (skewed
routing, experts with no rows, tokens with no expert); an MoE layer's outputs, input gradients,
router / shared / expert-weight gradients, aux losses and aux-loss-free bias updates equal the
one-process layer's, dropless and with capacity.
"""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

from . import workers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world, ep_sizes", [
    pytest.param(2, (2,), id="ep2"),
    pytest.param(4, (4, 2), id="ep4-and-dp2xep2"),
])
def test_expert_parallel_layer_equals_one_process(world: int, ep_sizes: tuple[int, ...]) -> None:
    mp.spawn(workers.run, args=(world, free_port(), ep_sizes), nprocs=world, join=True)
