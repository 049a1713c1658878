"""tests/hf: tiny models only, so one intra-op thread per test (tests/one_thread.py)."""

from tests.one_thread import one_thread  # noqa: F401 (an autouse fixture)
