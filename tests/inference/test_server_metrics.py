"""The server's GET /metrics (Prometheus text) against what it served and the expert cache's own
counters; `moekit serve --trace FILE` writes the trace at shutdown and its replay equals the live cache."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moekit.analysis.trace import RoutingTrace
from moekit.inference import Engine, load
from moekit.inference.cache_sim import layer_calls, simulate
from moekit.inference.offload import expert_sizes
from moekit.inference.trace_recorder import TraceRecorder
from tests.inference.test_server import NAME, Running
from tests.inference.tiny import save_tiny_with_tokenizer


def parse_metrics(text: str) -> dict[str, float]:
    """'moekit:name{labels} value' lines -> {'name{labels}': value}; checks HELP/TYPE precede each metric."""
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            assert key.split("{")[0] in typed, f"{key} has no # TYPE line"
            out[key.removeprefix("moekit:")] = float(value)
    return out


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, resp.getheader("content-type"), resp.read().decode()
    conn.close()
    return out


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("mixtral")
    save_tiny_with_tokenizer("mixtral", p)
    return p


def test_metrics_count_requests_tokens_and_the_cache(path):
    slot = expert_sizes(path).slot_bytes
    loaded = load(path, offload_experts=True, expert_cache=3 * slot)
    recorder = TraceRecorder()
    running = Running(Engine(loaded, max_batch_size=2, prefill_chunk=4, trace=recorder))
    try:
        client = running.client()
        status, kind, text = get(running.port, "/metrics")
        assert status == 200 and kind.startswith("text/plain")
        assert parse_metrics(text)[f'request_success_total{{model_name="{NAME}",finished_reason="stop"}}'] == 0
        prompts = ["hello there", "abc", "the quick brown fox"]
        with ThreadPoolExecutor(3) as pool:  # concurrent: batched decode steps
            outs = list(pool.map(lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=6,
                                                                     temperature=0), prompts))
        m = parse_metrics(get(running.port, "/metrics")[2])
        tag = f'model_name="{NAME}"'
        served = sum(v for k, v in m.items() if k.startswith("request_success_total"))
        assert served == 3
        assert m[f"generation_tokens_total{{{tag}}}"] == sum(o.usage.completion_tokens for o in outs)
        assert m[f"prompt_tokens_total{{{tag}}}"] == sum(o.usage.prompt_tokens for o in outs)
        assert m[f"num_requests_running{{{tag}}}"] == 0
        live = loaded.model.expert_cache.stats
        assert (m[f"expert_cache_hits_total{{{tag}}}"], m[f"expert_cache_misses_total{{{tag}}}"],
                m[f"expert_cache_read_bytes_total{{{tag}}}"]) == (live.hits, live.misses, live.bytes_read)
        assert m[f"expert_cache_slots{{{tag}}}"] == 3 and live.misses > 0
    finally:
        running.stop()
    sim = simulate(layer_calls(recorder.trace()), slots=3, policy="lru", read_bytes=expert_sizes(path).read_bytes,
                   tokens=recorder.num_tokens)
    assert (sim.hits, sim.misses) == (live.hits, live.misses)


def test_metrics_without_offloading_has_no_cache_lines(path):
    running = Running(Engine(load(path), max_batch_size=1))
    try:
        text = get(running.port, "/metrics")[2]
    finally:
        running.stop()
    assert "num_requests_waiting" in text and "expert_cache" not in text


def test_cli_serve_writes_the_trace_at_shutdown(path, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    file = tmp_path / "served.safetensors"
    slot = expert_sizes(path).slot_bytes
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(path), "--port", str(port), "--name", NAME,
                             "--offload-experts", "--expert-cache", str(2 * slot), "--trace", str(file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hello", "max_tokens": 5,
                                                                 "temperature": 0}),
                     headers={"Content-Type": "application/json"})
        usage = json.loads(conn.getresponse().read())["usage"]
        conn.close()
        m = parse_metrics(get(port, "/metrics")[2])
        hits, misses = (m[f'expert_cache_{n}_total{{model_name="{NAME}"}}'] for n in ("hits", "misses"))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    trace = RoutingTrace.load(file)
    assert f"routing trace of {trace.num_tokens} tokens written to {file}" in out
    assert trace.num_tokens == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    sim = simulate(layer_calls(trace), slots=2, policy="lru", read_bytes=expert_sizes(path).read_bytes,
                   tokens=trace.num_tokens)
    assert (sim.hits, sim.misses) == (hits, misses)
