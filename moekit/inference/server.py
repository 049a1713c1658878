"""An OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn).

GET /health, GET /v1/models, GET /metrics (Prometheus text: requests served, tokens, the expert
cache's counters; `moekit.inference.metrics`), POST /v1/completions, POST /v1/chat/completions; `stream: true`
sends server-sent events (`data: {...}` chunks, `data: [DONE]` last; `stream_options.include_usage`
adds a usage chunk). Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}
with a 4xx status (429 when the engine's queue is full). The extension field
`"moekit": {"routing": true}` adds, per choice and MoE layer, this request's tokens per expert.
The engine steps in one background thread; a client that goes away cancels its requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from moekit.inference.engine import Engine, QueueFull, Request
from moekit.inference.generate import prompt_ids
from moekit.inference.metrics import CONTENT_TYPE, ServerCounters, render
from moekit.inference.sampling import SamplingParams
from moekit.inference.tokenizer import check_messages

MAX_N = 16
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "presence_penalty", "frequency_penalty", "logit_bias",
               "tools", "suffix")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param, code="invalid_value")


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {value}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {json.dumps(value)[:40]}")
    if value < lo or (hi is not None and value > hi):
        raise _bad(name, f"must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {json.dumps(value)[:40]}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise _bad("stop", "must be a non-empty string or a list of them")
    return tuple(value)


def _object(body: dict, name: str) -> dict:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(name, "must be an object")
    return value


@dataclass(frozen=True)
class Parsed:
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt (max_tokens may depend on the prompt)
    n: int
    stream: bool
    include_usage: bool
    routing: bool


class Server:
    """The app's state: the engine, its thread and the model name."""

    def __init__(self, engine: Engine, name: str | None = None) -> None:
        self.engine, self.name = engine, name or engine.loaded.name
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.counters = ServerCounters()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.engine.run, args=(self.stop,), name="moekit-engine",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.engine.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # ---- request parsing ----
    def parse(self, body: Any, *, chat: bool) -> Parsed:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model", "must be a string")
        if isinstance(model, str) and model != self.name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, 0, [], {}):
                raise APIError(400, f"'{name}' is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")
        tok = self.engine.loaded
        if chat:
            messages = body.get("messages")
            if isinstance(messages, list):
                messages = [_flatten(m) for m in messages]
            try:
                check_messages(messages)
                prompts = [prompt_ids(tok, messages, chat=True)]
            except ValueError as err:
                raise _bad("messages", str(err)) from err
        else:
            prompts = self._prompts(body.get("prompt"))
        if any(len(p) == 0 for p in prompts):
            raise _bad("prompt" if not chat else "messages", "is empty: give at least one token")
        max_len = self.engine.max_len
        longest = max(len(p) for p in prompts)
        if longest >= max_len:
            raise APIError(400, f"the prompt has {longest} tokens; this server's context window is {max_len}",
                           param="prompt", code="context_length_exceeded")
        default_max = max_len - longest if chat else 16
        max_tokens = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else None
        max_tokens = _integer(body if max_tokens is None else {"max_tokens": max_tokens}, "max_tokens",
                              default_max, 1)
        assert max_tokens is not None
        if longest + max_tokens > max_len:
            raise APIError(400, f"the prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                           f"context window of {max_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        n = _integer(body, "n", 1, 1, MAX_N)
        assert n is not None
        extension = _object(body, "moekit")
        stream_options = _object(body, "stream_options")
        base = dict(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0), top_k=_integer(body, "top_k", 0, 0) or 0,
                    stop=_stop(body))
        if base["top_p"] == 0:
            base["top_p"] = 1e-9  # keep only the most likely token
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        params = []
        for i in range(len(prompts) * n):
            params.append(SamplingParams(**base, seed=None if seed is None else seed + i))
        return Parsed(prompts=prompts, params=params, n=n, stream=_bool(body, "stream", False),
                      include_usage=_bool(stream_options, "include_usage", False),
                      routing=_bool(extension, "routing", False))

    def _prompts(self, prompt: Any) -> list[list[int]]:
        tok = self.engine.loaded
        if prompt is None:
            raise _bad("prompt", "is required")
        if isinstance(prompt, str):
            return [prompt_ids(tok, prompt, chat=False) if prompt else []]
        is_id = lambda t: isinstance(t, int) and not isinstance(t, bool)  # noqa: E731
        if isinstance(prompt, list) and prompt and all(is_id(t) for t in prompt):
            vocab = tok.model.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise _bad("prompt", f"token ids must be in [0, {vocab})")
            return [list(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [prompt_ids(tok, p, chat=False) if p else [] for p in prompt]
        if isinstance(prompt, list) and not prompt:
            return [[]]
        raise _bad("prompt", "must be a string, a list of strings or a list of token ids")

    # ---- running ----
    def submit(self, parsed: Parsed, loop: asyncio.AbstractEventLoop) -> tuple[list[Request], asyncio.Queue]:
        """Submit one engine request per (prompt, choice); events arrive on the returned queue."""
        events: asyncio.Queue = asyncio.Queue()

        def on_event(request: Request, delta: str) -> None:
            # finish_reason read now, in the engine thread: set only on the request's last event
            finish = request.finish_reason
            if finish is not None:
                self.counters.finished(request)
            loop.call_soon_threadsafe(events.put_nowait, (request, delta, finish))

        requests: list[Request] = []
        try:
            for i, params in enumerate(parsed.params):
                ids = parsed.prompts[i // parsed.n]
                request = Request(prompt_ids=ids, params=params, routing=parsed.routing, on_event=on_event)
                requests.append(self.engine.submit(request))
        except QueueFull as err:
            for r in requests:
                self.engine.cancel(r)
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full") from err
        except ValueError as err:
            for r in requests:
                self.engine.cancel(r)
            raise APIError(400, str(err), code="invalid_value") from err
        return requests, events


def _flatten(message: Any) -> Any:
    """OpenAI content parts [{"type": "text", "text": ...}] joined into one string."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in parts):
            return {**message, "content": "".join(p["text"] for p in parts)}
    return message


def _usage(requests: list[Request], parsed: Parsed) -> dict:
    prompt = sum(len(p) for p in parsed.prompts)
    completion = sum(len(r.output_ids) for r in requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _routing(request: Request) -> dict:
    return {"routing": [{"layer": layer, "tokens_per_expert": counts.tolist()}
                        for layer, counts in sorted(request.routing_counts.items())]}


def create_app(engine: Engine, *, name: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (its engine thread starts and stops with the app)."""
    server = Server(engine, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="moekit", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def internal_error(_: HTTPRequest, err: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render(engine, server.counters, server.name), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                            "owned_by": "moekit", "max_model_len": engine.max_len}]}

    async def handle(http: HTTPRequest, chat: bool):
        raw = await http.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err
        parsed = server.parse(body, chat=chat)
        loop = asyncio.get_running_loop()
        requests, events = server.submit(parsed, loop)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        index = {r.id: i for i, r in enumerate(requests)}
        if parsed.stream:
            return StreamingResponse(_stream(server, parsed, requests, events, index, rid, created, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            pending = len(requests)
            while pending:
                request, _, finish = await events.get()
                if finish == "error":
                    raise APIError(500, f"generation failed: {request.error}", type="server_error")
                pending -= finish is not None
        finally:
            for r in requests:
                if not r.done:
                    engine.cancel(r)
        choices = []
        for i, r in enumerate(requests):
            choice: dict[str, Any] = {"index": i, "finish_reason": r.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": r.text}
            else:
                choice.update(text=r.text, logprobs=None)
            if parsed.routing:
                choice["moekit"] = _routing(r)
            choices.append(choice)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": server.name, "choices": choices, "usage": _usage(requests, parsed)}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await handle(http, chat=True)

    return app


async def _stream(server: Server, parsed: Parsed, requests: list[Request], events: asyncio.Queue,
                  index: dict[int, int], rid: str, created: int, chat: bool) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra: Any) -> str:
        data = {"id": rid, "object": obj, "created": created, "model": server.name, "choices": choices,
                **extra}
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(requests))])
        pending = len(requests)
        while pending:
            request, delta, finish = await events.get()
            i = index[request.id]
            if finish == "error":
                error = {"message": f"generation failed: {request.error}", "type": "server_error",
                         "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            finished = finish is not None
            if not delta and not finished:
                continue
            choice: dict[str, Any] = {"index": i, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": delta} if delta else {}
            else:
                choice.update(text=delta, logprobs=None)
            if finished and parsed.routing:
                choice["moekit"] = _routing(request)
            yield chunk([choice])
            pending -= finished
        if parsed.include_usage:
            yield chunk([], usage=_usage(requests, parsed))
        yield "data: [DONE]\n\n"
    finally:  # a client that disconnects (the generator is closed) frees its slots
        for r in requests:
            if not r.done:
                server.engine.cancel(r)
