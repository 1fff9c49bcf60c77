"""The HTTP API: generation (streamed or not), chat, classification, model info, metrics.

    app = create_app(served, Limits())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (JSON bodies; every answer about the model carries the parameter ``version`` it used):

    POST /v1/generate  {prompt, max_tokens, temperature, top_k, top_p, seed, stream}
                       -> {text, tokens, finish_reason, version}; with ``stream``, server-sent
                       events: ``data: {"text": piece}`` per new piece of text, then
                       ``data: {"done": true, text, tokens, finish_reason, version}``
    POST /v1/chat      {messages: [{role: system|user|assistant, content}], max_tokens, ...}
                       -> {message: {role: assistant, content}, version, ...}
    POST /v1/classify  {text} -> {label, probabilities: {label: p}, version}
    GET  /v1/model     run, task, source, step, version, refreshed_at, labels
    GET  /healthz      {status: ok} once parameters are loaded (503 before)
    GET  /metrics      Prometheus text: requests, latency, generated tokens, model version

Chat prompt format: the conversation as plain text, one turn per line, ``System: ...`` first
if given, then ``User: ...`` and ``Assistant: ...`` turns, ending with ``Assistant:``; the reply
is what the model writes next, cut where it starts a new ``User:`` turn (or at max_tokens).
A small model trained on news will not converse well; the format is what a dialogue corpus
(lines ``User: ...`` / ``Assistant: ...``) trains it for.

Bad requests are 4xx with ``{"error": {"type", "message"}}``: 422 for a body that does not
validate, 413 for a body over the limit, 408 for one not sent in time (``pslm.serve.intake``),
400 for a request the model cannot take (e.g. classifying with a language model), 503 while
no parameters are loaded or while ``max_inflight`` generations are.

A generation whose client leaves stops after the token in progress, streamed or not, and
gives its place back (a non-streamed one is counted as status 499).
"""

# no `from __future__ import annotations`: FastAPI reads the request models, made in
# create_app, from the endpoints' annotations at run time
import asyncio
import contextlib
import ipaddress
import json
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pslm.errors import ConfigError
from pslm.lm.classifier import GPTClassifier, encode_texts
from pslm.lm.classifier import classify as classify_texts
from pslm.lm.generate import stream as token_stream
from pslm.lm.model import GPT
from pslm.serve.dashboard import add_dashboard
from pslm.serve.intake import BodyReader
from pslm.serve.model import ServedModel, State


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for."""

    max_prompt_chars: int = 8192
    max_tokens: int = 1024
    max_messages: int = 64
    max_body_bytes: int = 1024 * 1024
    """Request bodies over this are refused with 413 (a chat of ``max_messages`` turns of
    ``max_prompt_chars`` each is 512 KiB of plain text)."""
    body_timeout: float = 30.0
    """Seconds a request may take to send its body; then 408 (``pslm.serve.intake``)."""
    kv_cache: bool = True
    parallel: int = 1
    """Requests whose next token is computed at the same time. On a CPU, 1 - concurrent
    requests take turns token by token - gives the most tokens/s: forward passes running
    side by side only contend for the cores (``pslm bench serve``)."""
    max_inflight: int = 32
    """Generations admitted at once (computing or waiting their turn); more get 503 at once.
    Below the server's 40 worker threads, so that other routes always find one free."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names a request's ``Host`` and ``Origin`` may name besides the loopback ones
    (127.0.0.0/8, ::1, localhost); anything else is refused with 403, so that a web page
    cannot reach this server through a name it controls (DNS rebinding) or post to it from
    another origin."""


def host_allowed(value: str, allowed: tuple[str, ...]) -> bool:
    """Whether a ``Host`` header (``name[:port]``) or an ``Origin`` (``scheme://name[:port]``)
    names loopback or one of ``allowed``."""
    name = urlsplit(value if "//" in value else f"//{value}").hostname
    if name is None:
        return False
    try:
        loopback = ipaddress.ip_address(name).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:  # a name
        loopback = name == "localhost"
    return loopback or name in allowed


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.retry_after = status, kind, retry_after


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def create_app(
    served: ServedModel,
    limits: Limits = Limits(),  # noqa: B008
    scheduler: str | None = None,
) -> FastAPI:
    """The API; with ``scheduler`` (a live cluster) the dashboard can steer it too."""
    app = FastAPI(title="pslm", version="1", docs_url=None, redoc_url=None)
    metrics = _Metrics(served)
    turns = Turns(limits.parallel)
    admission = Admission(limits.max_inflight)
    metrics.inflight.set_function(lambda: float(admission.inflight))
    app.state.served, app.state.limits, app.state.metrics = served, limits, metrics

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_tokens: int = Field(64, ge=1, le=limits.max_tokens)
        temperature: float = Field(1.0, ge=0.0, le=100.0)
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        seed: int | None = Field(None, ge=0, lt=2**63)
        stream: bool = False

    class GenerateRequest(Sampling):
        prompt: str = Field(min_length=1, max_length=limits.max_prompt_chars)

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal["system", "user", "assistant"]
        content: str = Field(max_length=limits.max_prompt_chars)

    class ChatRequest(Sampling):
        messages: list[ChatMessage] = Field(min_length=1, max_length=limits.max_messages)

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str = Field(min_length=1, max_length=limits.max_prompt_chars)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        text = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
        return _error(422, "invalid_request", str(text))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.kind, str(exc))
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(ConfigError)  # e.g. a character a char tokenizer does not know
    async def unusable(request: Request, exc: ConfigError) -> JSONResponse:
        return _error(400, "invalid_request", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http", str(exc.detail))

    # inside `measure` (added before it): bodies are read, and refused, once the host is known
    app.add_middleware(BodyReader, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        host, origin = request.headers.get("host", ""), request.headers.get("origin")
        if not host_allowed(host, limits.allowed_hosts) or (
            origin is not None and not host_allowed(origin, limits.allowed_hosts)
        ):
            response: Response = _error(
                403,
                "forbidden_host",
                "this server answers only the hosts it was told to "
                "(loopback; pslm serve --allow-host NAME for others)",
            )
            response.headers["connection"] = "close"  # its body, if any, was not read
        else:
            response = await call_next(request)
        metrics.observe(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    def state() -> State:
        current = served.current
        if current is None:
            raise ApiError(503, "not_ready", "no parameters yet: the cluster was not read yet")
        return current

    def lm(current: State) -> GPT:
        if not isinstance(current.model, GPT):
            raise ApiError(400, "wrong_task", "this run classifies text: use /v1/classify")
        return current.model

    # the cheap routes run on the event loop itself, not in the worker threads that
    # generations may fill: /healthz and /metrics answer whatever the load
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        current = served.current
        if current is None:
            return _error(503, "not_ready", "no parameters yet")
        return JSONResponse({"status": "ok", "version": current.version})

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        current = served.current
        return {
            "run": str(served.run_dir),
            "task": served.task,
            "source": served.source,
            "labels": served.labels,
            "block_size": served.block_size,
            "step": current.step if current else None,
            "version": current.version if current else None,
            "refreshed_at": current.refreshed_at if current else None,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # generations run in worker threads (the event loop stays free) and stop between two
    # tokens once their client has left
    @app.post("/v1/generate", response_model=None)
    async def generate(req: GenerateRequest, request: Request) -> dict[str, Any] | Response:
        current = state()
        model = lm(current)
        ids = await run_in_threadpool(_encode, served, req.prompt)
        with admission.admit() as ticket:
            gen = _Generation(served, model, ids, req, None, metrics, limits.kv_cache, turns)
            if req.stream:
                return _EventStream(gen, current, ticket)
            result = await _unless_gone(gen, request)
        if result is None:
            return _client_gone()
        return {**result, "version": current.version}

    @app.post("/v1/chat", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> dict[str, Any] | Response:
        current = state()
        model = lm(current)
        prompt = chat_prompt([(m.role, m.content) for m in req.messages])
        ids = await run_in_threadpool(_encode, served, prompt)
        with admission.admit() as ticket:
            gen = _Generation(served, model, ids, req, STOP_TURN, metrics, limits.kv_cache, turns)
            if req.stream:
                return _EventStream(gen, current, ticket)
            result = await _unless_gone(gen, request)
        if result is None:
            return _client_gone()
        return {
            "message": {"role": "assistant", "content": result.pop("text").strip()},
            **result,
            "version": current.version,
        }

    @app.post("/v1/classify")
    def classify(req: ClassifyRequest) -> dict[str, Any]:
        current = state()
        if not isinstance(current.model, GPTClassifier):
            raise ApiError(400, "wrong_task", "this run is a language model: use /v1/generate")
        windows = int(served.meta.get("windows", 1))
        enc = encode_texts(served.tokenizer, [req.text], served.block_size, windows)
        with torch.inference_mode():
            probs = classify_texts(current.model, enc)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return {
            "label": served.labels[best],
            "probabilities": dict(zip(served.labels, probs, strict=True)),
            "version": current.version,
        }

    add_dashboard(app, served.run_dir, scheduler)
    return app


STOP_TURN = "\nUser:"
PATHS = (
    *("/v1/generate", "/v1/chat", "/v1/classify", "/v1/model", "/healthz", "/metrics"),
    *("/dashboard", "/api/cluster", "/api/metrics", "/api/ctl"),
)


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The conversation as the text the model continues (the module's chat format)."""
    lines = [f"{role.capitalize()}: {' '.join(content.split())}" for role, content in messages]
    return "\n".join(lines) + "\nAssistant:"


def _client_gone() -> JSONResponse:
    """What a generation whose client left answers (to no one; for the metrics: nginx's 499)."""
    return _error(499, "client_gone", "the client left before the answer")


def _encode(served: ServedModel, text: str) -> list[int]:
    ids = served.tokenizer.encode(text)
    if not ids:
        raise ApiError(400, "empty_prompt", "the prompt encodes to no tokens")
    return ids


class Turns:
    """At most ``n`` holders at once, served first come, first served (a plain lock lets one
    thread take it again and again while others wait: unfair tail latencies)."""

    def __init__(self, n: int):
        self.n = n
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = 0

    def __enter__(self) -> None:
        me = object()
        with self._cond:
            self._queue.append(me)
            self._cond.wait_for(lambda: self._held < self.n and self._queue[0] is me)
            self._queue.popleft()
            self._held += 1
            self._cond.notify_all()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._held -= 1
            self._cond.notify_all()


class Admission:
    """At most ``limit`` generations in flight; one more is refused with 503 at once (a queue
    without bound would hold every worker thread and every client for ever)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.inflight = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def admit(self) -> Iterator["Ticket"]:
        """Admit a generation for the ``with`` block, or longer if it hands its ticket on."""
        with self._lock:
            if self.inflight >= self.limit:
                raise ApiError(
                    503, "busy", f"{self.limit} generations in flight: try again", retry_after=1
                )
            self.inflight += 1
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            if not ticket.handed:
                ticket.release()

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1


class Ticket:
    """One admitted generation; released once."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.handed = False
        self._released = False
        self._lock = threading.Lock()  # released by the request, or by the collector

    def hand_to(self, holder: object) -> None:
        """Release when ``holder`` is collected instead of at the end of ``admit``."""
        self.handed = True
        weakref.finalize(holder, self.release)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.admission.leave()


class _Generation:
    """New text as it is generated, in pieces that end on a whole character (a byte-level
    token may end inside one); ``tokens`` and ``finish_reason`` once it is over. ``cancel``
    (from any thread) stops it before its next token."""

    def __init__(
        self,
        served: ServedModel,
        model: GPT,
        prompt: list[int],
        req: Any,
        stop_text: str | None,
        metrics: "_Metrics",
        kv_cache: bool = True,
        turns: "Turns | None" = None,
    ):
        self.turns = turns or Turns(1)
        self.served, self.stop_text, self.metrics = served, stop_text, metrics
        self.tokens = 0
        self.finish_reason = "length"
        """``length``, ``stop`` (the stop text), or ``cancelled``."""
        self._cancelled = threading.Event()
        self._ids = token_stream(  # the arguments were validated with the request
            model,
            prompt,
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
            use_cache=kv_cache,
        )

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        sent = ""
        while True:
            with self.turns:  # one token, then another request's turn
                if self._cancelled.is_set():
                    self.finish_reason = "cancelled"
                    break
                token = next(self._ids, None)
            if token is None:
                break
            ids.append(token)
            self.tokens += 1
            self.metrics.tokens.inc()
            text = self.served.tokenizer.decode(ids)
            if self.stop_text is not None and self.stop_text in text:
                text, self.finish_reason = text[: text.index(self.stop_text)], "stop"
            elif text.endswith("\ufffd"):  # a character cut in half: wait for the rest
                continue
            if len(text) > len(sent):
                yield text[len(sent) :]
                sent = text
            if self.finish_reason == "stop":
                return
        final = self.served.tokenizer.decode(ids)
        if len(final) > len(sent):
            yield final[len(sent) :]

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self) -> dict[str, Any]:
        """The whole generation (blocks while it is generated)."""
        text = "".join(self)
        return {"text": text, "tokens": self.tokens, "finish_reason": self.finish_reason}


async def _unless_gone(gen: _Generation, request: Request) -> dict[str, Any] | None:
    """``gen.result()``, generated in a worker thread; None if the client left first: the
    generation stops after the token in progress (so does one whose request is cancelled,
    as when the server stops). Errors are raised as they are (no task group wraps them)."""
    watch = asyncio.ensure_future(_cancel_when_gone(gen, request))
    try:
        result = await anyio.to_thread.run_sync(gen.result, abandon_on_cancel=True)
    finally:
        gen.cancel()  # (a finished generation ignores it)
        watch.cancel()
    return None if result["finish_reason"] == "cancelled" else result


async def _cancel_when_gone(gen: _Generation, request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # (the body was read: nothing but the disconnect comes)
    gen.cancel()


class _EventStream(StreamingResponse):
    """A generation as server-sent events (the module's format). It holds its admission
    until the response is over - finished, or its client gone - and not until the collector
    finds the generator (requests that had finished held places for seconds)."""

    def __init__(self, gen: _Generation, current: State, ticket: Ticket):
        headers = {"X-Model-Version": str(current.version), "Cache-Control": "no-cache"}
        super().__init__(_events(gen, current), media_type="text/event-stream", headers=headers)
        self.gen, self.ticket = gen, ticket
        ticket.hand_to(self)  # (for a response that is never sent)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # a client that leaves stops the stream once the token in progress is out (the
            # worker thread is waited for): starlette listens for the disconnect
            await super().__call__(scope, receive, send)
        finally:
            self.gen.cancel()
            self.ticket.release()


def _events(gen: _Generation, current: State) -> Iterator[str]:
    text = []
    for piece in gen:
        text.append(piece)
        yield f"data: {json.dumps({'text': piece, 'version': current.version})}\n\n"
    done = {
        "done": True,
        "text": "".join(text),
        "tokens": gen.tokens,
        "finish_reason": gen.finish_reason,
        "version": current.version,
    }
    yield f"data: {json.dumps(done)}\n\n"


class _Metrics:
    """Prometheus metrics of one app (its own registry)."""

    def __init__(self, served: ServedModel):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pslm_http_requests",
            "HTTP requests answered",
            ["path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pslm_http_request_seconds",
            "Seconds to the start of the response",
            ["path"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter("pslm_generated_tokens", "Tokens generated", registry=self.registry)
        self.version = Gauge(
            "pslm_model_version", "Parameter version being served", registry=self.registry
        )
        self.version.set_function(lambda: float(served.current.version) if served.current else -1.0)
        self.inflight = Gauge(
            "pslm_generations_inflight",
            "Generations admitted and not finished",
            registry=self.registry,
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        known = path if path in PATHS else "other"  # no label per made-up path
        self.requests.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)
