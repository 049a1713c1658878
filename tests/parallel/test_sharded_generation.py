"""Generation with the experts split over ranks gives exactly the one-process output.

Spawned gloo ranks (generation_workers.py): logits and the batching engine's greedy tokens equal
an unsharded copy's, for 2 and 4 ranks. `torchrun ... moekit generate --expert-parallel 2` prints
the one-process completion and every rank exits 0; `moekit serve` under 2 ranks answers with the
one-process tokens and, on Ctrl-C to rank 0, both ranks exit cleanly. Bad layouts are refused
before the weights are read. A forward that fails on rank 0 after the followers started it stops
the group (rank 0 refuses further forwards; the follower errors out when rank 0 exits) instead of
hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch.multiprocessing as mp

import moekit
from moekit.cli import main
from moekit.inference import load
from moekit.parallel.serving import check_inference_launch
from tests.inference.tiny import save_tiny_with_tokenizer

from . import generation_workers
from .test_expert_parallel import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    def get(model_type: str) -> Path:
        path = tmp_path_factory.mktemp(model_type)
        save_tiny_with_tokenizer(model_type, path)
        return path

    return get


@pytest.mark.parametrize("model_type, world", [
    pytest.param("qwen2_moe", 2, id="qwen2_moe-ep2"),  # shared experts beside the routed ones
    pytest.param("deepseek_v3", 4, id="deepseek_v3-ep4"),  # 8 experts, group-limited routing, MLA
])
def test_sharded_engine_equals_one_process(tiny, model_type: str, world: int) -> None:
    mp.spawn(generation_workers.run, args=(world, free_port(), str(tiny(model_type))), nprocs=world, join=True)


def _one_process(path: Path, prompt: str, n: int):
    result = moekit.generate(load(path), prompt, max_new_tokens=n, temperature=0)
    assert result.text.strip()
    return result


@pytest.mark.slow
def test_torchrun_generate_prints_the_one_process_completion(tiny) -> None:
    path = tiny("mixtral")
    argv = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "moekit", "generate", str(path), "--prompt", "hello",
            "--max-new-tokens", "10", "--temperature", "0", "--expert-parallel", "2"]
    two = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=180, env=ENV,
                         check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0 alone prints (the prompt, then the completion); the followers print nothing
    assert two.stdout == "hello" + _one_process(path, "hello", 10).text + "\n"


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _wait_healthy(port: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited: " + " | ".join(p.stderr.read()[-1500:] for p in procs
                                                                  if p.poll() is not None))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the server did not come up")


@pytest.mark.slow
def test_serve_on_two_ranks_answers_like_one_and_shuts_down_cleanly(tiny) -> None:
    path = tiny("mixtral")
    body = {"prompt": "the fox", "max_tokens": 8, "temperature": 0}
    port, master = free_port(), free_port()
    # The ranks are started as torchrun starts them (its environment variables), so that the test
    # can press Ctrl-C on rank 0 alone, as a terminal does on the process that serves.
    procs = [subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(path), "--port", str(port),
                               "--expert-parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)})
             for r in range(2)]
    try:
        _wait_healthy(port, procs)
        sharded = _post(port, body)
        procs[1].send_signal(signal.SIGINT)  # a follower ignores Ctrl-C: it ends with rank 0
        time.sleep(0.5)
        assert procs[1].poll() is None
        procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reference = _one_process(path, body["prompt"], body["max_tokens"])
    assert sharded["choices"][0]["text"] == reference.text
    assert sharded["usage"]["completion_tokens"] == len(reference.token_ids)


TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("model_type, kwargs, env, message", [
    pytest.param("mixtral", {"expert_parallel": 2, "weights": {}}, {},
                 r"--expert-parallel 2 needs 2 processes; launch with torchrun --nproc-per-node 2",
                 id="no-torchrun"),
    pytest.param("mixtral", {"expert_parallel": 4, "weights": {}}, TORCHRUN,
                 r"the world size 2 must equal --expert-parallel 4", id="world-not-ep"),
    pytest.param("mixtral", {"expert_parallel": None, "weights": {}}, TORCHRUN,
                 r"the world size 2 must equal --expert-parallel None", id="ep-missing"),
    pytest.param("mixtral", {"expert_parallel": 2, "weights": {"quantize": "int8"}}, TORCHRUN,
                 r"does not combine with quantize", id="quantized"),
    pytest.param("olmoe", {"expert_parallel": 3, "weights": {}}, {**TORCHRUN, "WORLD_SIZE": "3"},
                 r"num_experts=4 is not divisible by --expert-parallel 3", id="experts-not-divisible"),
    pytest.param("olmoe", {"expert_parallel": 0, "weights": {}}, TORCHRUN, r"--expert-parallel 0 is invalid",
                 id="ep-zero"),
])
def test_bad_generation_layout_is_a_clear_error(tiny, model_type, kwargs, env, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_inference_launch(path=tiny(model_type), env=env, **kwargs)


def test_generate_expert_parallel_without_torchrun_on_the_command_line(tiny, capsys, monkeypatch) -> None:
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert main(["generate", str(tiny("mixtral")), "--prompt", "a", "--expert-parallel", "2"]) == 2
    assert "--expert-parallel 2 needs 2 processes" in capsys.readouterr().err


def test_a_failed_forward_stops_the_group_instead_of_hanging(tiny) -> None:
    mp.spawn(generation_workers.run_failed_forward, args=(2, free_port(), str(tiny("mixtral"))), nprocs=2,
             join=True)
