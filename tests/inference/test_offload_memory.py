"""Peak RSS of offloaded decoding stays within the cache budget + the resident weights + a fixed
overhead, on a checkpoint with about 500 MB of routed experts and a 100 MB cache (fresh process)."""

from __future__ import annotations

import pytest

from tests.inference.offload_memory import run_child

# Measured here: RSS beyond (RSS after imports and a meta-device warm-up) + resident weights + the
# filled cache was 35 MB (first-forward buffers, per-read staging, KV cache, allocator slack).
OVERHEAD = 64 * 2**20


@pytest.mark.slow
def test_offloaded_decode_peak_rss_within_budget(tmp_path):
    built = run_child("build", str(tmp_path), "--mb", "500")
    assert built["expert_bytes"] > 480e6
    got = run_child("measure", str(tmp_path), "--cache", "100MB", "--steps", "4")
    assert got["cache_bytes"] <= 100e6 and got["stats"]["misses"] > got["cache_bytes"] / (6 * 2**20)
    bound = got["base"] + got["resident_bytes"] + 100e6 + OVERHEAD
    # the experts alone (500 MB) are more than twice this bound's share for weights and cache
    assert got["peak"] <= bound, {**got, "bound": bound, "over_by_MB": (got["peak"] - bound) / 2**20}
