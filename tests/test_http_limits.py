"""pslm serve against clients that are slow, send too much, or leave: a real uvicorn server
on 127.0.0.1 (``pslm.serve.intake.http_server``, as ``pslm serve`` runs it) in this process,
serving a tiny model, talked to over raw sockets."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from pslm.serve.app import Limits, create_app
from pslm.serve.intake import http_server
from tests.test_serve import _served

HEAD = "POST /v1/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"


@contextlib.contextmanager
def serving(limits: Limits, *, head_timeout: float = 10.0) -> Iterator[tuple[str, int]]:
    """A server for ``_served()`` with these limits; yields its (host, port)."""
    server = http_server(create_app(_served(), limits), head_timeout=head_timeout)
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


def connect(addr: tuple[str, int], data: bytes = b"") -> socket.socket:
    conn = socket.create_connection(addr, timeout=5)
    conn.sendall(data)
    return conn


def until_closed(conn: socket.socket, within: float) -> bytes:
    """All the server sends until it closes the connection; fails if it is still open after
    ``within`` seconds."""
    received = b""
    deadline = time.monotonic() + within
    with conn:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"still open after {within} s; received {received[:200]!r}"
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue  # (the assertion above says so)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def status_and_head(response: bytes) -> tuple[int, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode().lower()
    return int(head.split()[1]), head


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    values = [line.split()[1] for line in text.splitlines() if line.startswith(f"{name} ")]
    assert values, name
    return float(values[0])


def test_a_request_head_never_finished_is_closed_in_time() -> None:
    """A slowloris client (a head begun and never ended, or nothing sent at all) loses its
    connection after the head timeout, instead of holding it for ever."""
    with serving(Limits(), head_timeout=1.0) as addr:
        start = time.monotonic()
        with connect(addr, b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n") as partial:
            with connect(addr) as silent:
                assert status_and_head(until_closed(partial, within=5))[0] == 408
                assert until_closed(silent, within=5) == b""
        assert time.monotonic() - start >= 0.9  # the timeout, not an instant refusal
        ok = connect(addr, b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        assert status_and_head(until_closed(ok, within=5))[0] == 200


def test_a_body_never_finished_gets_408_and_is_closed() -> None:
    with serving(Limits(body_timeout=1.0)) as addr:
        conn = connect(addr, f"{HEAD}content-length: 100\r\n\r\n".encode() + b'{"prompt": ')
        response = until_closed(conn, within=5)
        status, head = status_and_head(response)
        assert status == 408 and "connection: close" in head
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "timeout"


def test_a_body_over_the_limit_gets_413_and_the_connection_is_closed() -> None:
    """The server does not read a body it refuses, so it cannot take the next request on the
    same connection: it closes it, rather than letting the client go on sending."""
    with serving(Limits(max_body_bytes=1024)) as addr:
        conn = connect(addr, f"{HEAD}content-length: 10000000\r\n\r\n".encode() + b"x" * 2048)
        status, head = status_and_head(until_closed(conn, within=3))
        assert status == 413 and "connection: close" in head
        chunked = connect(addr, f"{HEAD}transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".encode())
        status, head = status_and_head(until_closed(chunked, within=3))
        assert status == 411 and "connection: close" in head
        fits = json.dumps({"prompt": "the king", "max_tokens": 2}).encode()
        head = f"{HEAD}content-length: {len(fits)}\r\nconnection: close\r\n\r\n"
        assert status_and_head(until_closed(connect(addr, head.encode() + fits), 5))[0] == 200


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_generation_whose_client_left_stops_and_frees_its_place(stream: bool) -> None:
    """50,000 tokens would take minutes; the client leaves after the first: the generation
    stops, its place is free again within seconds, and the server answers meanwhile."""
    with serving(Limits(max_tokens=50_000, max_inflight=1)) as addr:
        base = f"http://{addr[0]}:{addr[1]}"
        body = json.dumps({"prompt": "the king", "max_tokens": 50_000, "stream": stream})
        conn = connect(addr, f"{HEAD}content-length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 10
        while metric(base, "pslm_generated_tokens_total") < 10:  # under way
            assert time.monotonic() < deadline, "the generation did not start"
        assert metric(base, "pslm_generations_inflight") == 1
        conn.close()
        left = time.monotonic()
        while metric(base, "pslm_generations_inflight") != 0:
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - left < 5, "the generation went on after its client left"
        tokens = metric(base, "pslm_generated_tokens_total")
        assert tokens < 50_000
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        assert metric(base, "pslm_generated_tokens_total") == tokens  # stopped, not just let go
        again = httpx.post(f"{base}/v1/generate", json={"prompt": "the", "max_tokens": 3})
        assert again.status_code == 200 and again.json()["tokens"] == 3  # its place is free


def test_a_stream_gives_its_place_back_without_the_garbage_collector() -> None:
    """A finished stream's place is given back when its response ends, not whenever the
    collector frees its generator (reference cycles kept places taken for seconds)."""
    with serving(Limits(max_inflight=1)) as addr:
        base = f"http://{addr[0]}:{addr[1]}"
        body = {"prompt": "the king", "max_tokens": 5, "stream": True}
        enabled = gc.isenabled()
        gc.disable()
        try:
            with httpx.Client(base_url=base, timeout=10) as http:
                for _ in range(3):  # one place: each needs the one before it to give it back
                    r = http.post("/v1/generate", json=body)
                    assert r.status_code == 200, r.text
                    assert '"done": true' in r.text
            assert metric(base, "pslm_generations_inflight") == 0
        finally:
            if enabled:
                gc.enable()
