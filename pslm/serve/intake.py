"""Reading requests off the connection within bounds of time and size.

    server = http_server(create_app(served, Limits(body_timeout=30)), head_timeout=10)
    server.run(sockets=[sock])

A client that sends a request slowly, or starts one and never finishes it, must not hold a
connection for ever (a "slowloris" holds them all):

- ``HeadDeadline`` (the HTTP/1.1 protocol, uvicorn's h11 one with a deadline): a request head
  not complete ``head_timeout`` seconds after its first byte (or after the connection opened)
  closes the connection, with a 408 if part of a head came. uvicorn has no such timeout: its
  keep-alive timer runs only between requests, and a byte of the next head stops it.
- ``BodyReader`` (ASGI middleware, in the app): the whole body is read before the app sees
  it, within ``timeout`` seconds and ``max_bytes``; otherwise 408 or 413, and the connection
  is closed (an unread body cannot be skipped to reach the next request).

A head is at most h11's 16 KiB (more is a 400 from uvicorn).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import anyio
import h11
import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head is not complete
    ``head_timeout`` seconds after it began. Subclass per timeout (``with_head_timeout``):
    uvicorn builds protocols from a class and its own ``Config``."""

    head_timeout: ClassVar[float] = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_head_timeout(cls, seconds: float) -> type[HeadDeadline]:
        return type("HeadDeadline", (cls,), {"head_timeout": seconds})

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()  # a connection that sends nothing at all is closed too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # waiting for (the rest of) a head
            if self._head_timer is None:
                self._arm()
        else:  # the head is in: the body's time is the app's (BodyReader)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head: say why (h11 cannot answer here)
            self.transport.write(_raw_408(self.head_timeout))
        self.transport.close()


def _raw_408(seconds: float) -> bytes:
    body = json.dumps(_error_body("timeout", f"the request head took over {seconds:g} s"))
    return (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}"
    ).encode()


def http_server(app: ASGIApp, *, head_timeout: float) -> uvicorn.Server:
    """A uvicorn server for ``app`` whose connections give up on a request head after
    ``head_timeout`` seconds. Run it with ``server.run(sockets=[sock])``."""
    config = uvicorn.Config(
        app,
        http=HeadDeadline.with_head_timeout(head_timeout),
        log_level="warning",
        timeout_graceful_shutdown=5,
        access_log=False,
    )
    return uvicorn.Server(config)


class BodyTooLarge(Exception):
    pass


class BodyReader:
    """ASGI middleware: reads each request's whole body, at most ``max_bytes`` within
    ``timeout`` seconds, then calls the app with it (and with the connection's own messages
    after it, such as ``http.disconnect``). Refusals close the connection: 413 for a body
    over the limit (declared or sent), 411 for a POST without ``Content-Length``, 408 for a
    body not complete in time, 499 (to no one) if the client left while sending it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refuse_head(scope)
        if refusal is None:
            try:
                with anyio.fail_after(self.timeout):
                    body = await self._read(receive)
            except TimeoutError:
                refusal = _refusal(408, "timeout", f"the body took over {self.timeout:g} s")
            except BodyTooLarge:
                refusal = self._too_large()
            else:
                if body is not None:
                    await self.app(scope, _replay(body, receive), send)
                    return
                refusal = _refusal(499, "client_gone", "the client left while sending its body")
        await refusal(scope, receive, send)  # (to no one after a 499: for the metrics)

    def _refuse_head(self, scope: Scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return self._too_large()
        if length is None and scope["method"] == "POST":
            return _refusal(411, "length_required", "send a Content-Length header")
        return None

    def _too_large(self) -> JSONResponse:
        return _refusal(413, "too_large", f"the body may hold at most {self.max_bytes} bytes")

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body; None if the client left first. BodyTooLarge past ``max_bytes``."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` whole, then the connection's own messages."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def _refusal(status: int, kind: str, message: str) -> JSONResponse:
    """An error answered before the body was read, so the connection cannot serve another
    request: it is closed after the answer."""
    return JSONResponse(
        _error_body(kind, message), status_code=status, headers={"connection": "close"}
    )
