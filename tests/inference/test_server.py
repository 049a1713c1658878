"""The OpenAI-compatible server with the real `openai` client, and raw HTTP for the error cases.

Each test module starts one uvicorn server on 127.0.0.1 (a socket bound to port 0) and stops it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn

import moekit
from moekit.inference import Engine, load
from moekit.inference.server import create_app
from tests.inference.tiny import save_tiny_with_tokenizer

NAME = "tiny"


class Running:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(engine, name=NAME), log_level="error", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)

    def post(self, path: str, body: bytes | str | dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, payload = resp.status, json.loads(resp.read() or b"null")
        conn.close()
        return status, payload


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    save_tiny_with_tokenizer("qwen3_moe", path)
    return load(path)


@pytest.fixture(scope="module")
def served(loaded):
    running = Running(Engine(loaded, max_batch_size=4, max_queue=8, prefill_chunk=8))
    yield running
    running.stop()


def _alone(loaded, prompt, n, **kw):
    return moekit.generate(loaded, prompt, max_new_tokens=n, temperature=0, **kw)


def test_completion_chat_and_models(served, loaded):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    want = _alone(loaded, "hello there", 8)
    out = client.completions.create(model=NAME, prompt="hello there", max_tokens=8, temperature=0)
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(want.prompt_ids) and out.usage.completion_tokens == len(want.token_ids)
    chat_want = _alone(loaded, "hi", 6, chat=True)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].message.content == chat_want.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == len(chat_want.prompt_ids) + len(chat_want.token_ids)


def test_streaming_usage_n_seed_and_stop(served, loaded):
    client = served.client()
    want = _alone(loaded, "the quick brown fox", 10)
    chunks = list(client.completions.create(model=NAME, prompt="the quick brown fox", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    chat = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chat) == _alone(loaded, "hi", 6, chat=True).text
    a = client.completions.create(model=NAME, prompt="abc", max_tokens=12, temperature=1.0, seed=5, n=2)
    b = client.completions.create(model=NAME, prompt="abc", max_tokens=12, temperature=1.0, seed=5, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert a.choices[0].text == moekit.generate(loaded, "abc", max_new_tokens=12, temperature=1.0, seed=5).text
    stop = want.text[3:5]
    cut = client.completions.create(model=NAME, prompt="the quick brown fox", max_tokens=10, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == want.text[:want.text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_routing_telemetry(served, loaded):
    out = served.post("/v1/completions", {"model": NAME, "prompt": "hello", "max_tokens": 5, "temperature": 0,
                                          "moekit": {"routing": True}})
    assert out[0] == 200
    want = _alone(loaded, "hello", 5, routing=True)
    layers = out[1]["choices"][0]["moekit"]["routing"]
    assert {l["layer"]: l["tokens_per_expert"] for l in layers} == want.routing
    fed = len(want.prompt_ids) + len(want.token_ids) - 1
    assert all(sum(l["tokens_per_expert"]) == fed * loaded.model.config.moe.top_k for l in layers)


def test_eight_concurrent_clients(served, loaded):
    prompts = [("a" * (i + 1)) + " b" for i in range(8)]
    want = [_alone(loaded, p, 6 + i).text for i, p in enumerate(prompts)]

    def ask(i: int) -> str:
        out = served.client().completions.create(model=NAME, prompt=prompts[i], max_tokens=6 + i, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == want


@pytest.mark.parametrize("path,body,status,param", [
    pytest.param("/v1/completions", b"{not json", 400, None, id="malformed-json"),
    pytest.param("/v1/completions", b"[1, 2]", 400, None, id="not-an-object"),
    pytest.param("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", id="max-tokens-type"),
    pytest.param("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", id="max-tokens-zero"),
    pytest.param("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens", id="beyond-context"),
    pytest.param("/v1/completions", {"prompt": "", "max_tokens": 3}, 400, "prompt", id="empty-prompt"),
    pytest.param("/v1/completions", {"prompt": 5}, 400, "prompt", id="prompt-type"),
    pytest.param("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", id="temperature"),
    pytest.param("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", id="stream-type"),
    pytest.param("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", id="n-zero"),
    pytest.param("/v1/completions", {"prompt": "hi", "model": "other"}, 404, "model", id="unknown-model"),
    pytest.param("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs", id="unsupported"),
    pytest.param("/v1/chat/completions", {"messages": []}, 400, "messages", id="no-messages"),
    pytest.param("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", id="no-content"),
])
def test_bad_requests_get_openai_errors(served, path, body, status, param):
    got, payload = served.post(path, body)
    assert got == status, payload
    error = payload["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"] and error["param"] == param
    assert served.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200  # still answers


def test_queue_full_is_429_and_disconnect_frees_the_slot(loaded, monkeypatch):
    engine = Engine(loaded, max_batch_size=1, max_queue=0)
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.05), step()))  # slow enough to be mid-stream
    cancelled, cancel = [], engine.cancel
    monkeypatch.setattr(engine, "cancel", lambda r: (cancelled.append(r), cancel(r)))
    running = Running(engine)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True}),
            headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        status, payload = running.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 429 and payload["error"]["code"] == "queue_full"
        conn.close()  # the client goes away mid-stream
        deadline = time.time() + 20
        while engine.running or engine.waiting:
            assert time.time() < deadline, "the slot of a disconnected client was not freed"
            time.sleep(0.05)
        assert [r.finish_reason for r in cancelled] == ["cancelled"]
        out = running.client().completions.create(model=NAME, prompt="hello", max_tokens=4, temperature=0)
        assert out.choices[0].text == _alone(loaded, "hello", 4).text
    finally:
        running.stop()


def test_a_failing_step_is_a_500_and_the_server_goes_on(loaded, monkeypatch):
    engine = Engine(loaded, max_batch_size=2)
    forward, calls = engine._forward, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return forward(*args, **kw)

    monkeypatch.setattr(engine, "_forward", flaky)
    running = Running(engine)
    try:
        status, payload = running.post("/v1/completions", {"prompt": "hello", "max_tokens": 3})
        assert status == 500 and "injected failure" in payload["error"]["message"]
        assert not engine.running and sorted(engine.free) == [0, 1]
        out = running.client().completions.create(model=NAME, prompt="hello", max_tokens=4, temperature=0)
        assert out.choices[0].text == _alone(loaded, "hello", 4).text
    finally:
        running.stop()


@pytest.mark.slow
def test_serve_command_starts_answers_and_stops(loaded):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "serve", str(loaded.path), "--port", str(port),
                             "--max-batch-size", "2", "--name", NAME], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.2)
        assert [m.id for m in models.data] == [NAME]
        out = client.completions.create(model=NAME, prompt="hello", max_tokens=4, temperature=0)
        assert out.choices[0].text == _alone(loaded, "hello", 4).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
