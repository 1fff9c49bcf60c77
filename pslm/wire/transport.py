"""ZeroMQ transport: bound listeners, connections, and request/reply with timeouts.

    listener = Listener("tcp://127.0.0.1:*")        # ROUTER: many peers talk to it
    peer, msg = listener.recv()                     # after a poll says it is readable
    listener.send(peer, msg.reply(version=3))

    channel = Channel(timeout=30.0)                 # DEALERs, one per peer
    channel.connect("server-0", listener.address)
    rid = channel.send("server-0", Message("pull"))  # returns at once
    replies = channel.wait([rid])                   # blocks until replied or RequestTimeout

The transport knows bytes and peers, never keys or models. With a cluster secret installed
(``pslm.wire.auth``), listeners admit only peers that prove it and connections prove it.
Messages are ``message.Message``; every ZeroMQ error is mapped to a pslm error here. Sockets
are not thread-safe: a Listener or a Channel belongs to the thread that made it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import zmq

from pslm.errors import (
    Interrupted,
    ProtocolError,
    RefusedError,
    RequestTimeout,
    TransportError,
)
from pslm.wire import auth
from pslm.wire.message import (
    DEFAULT_MAX_MESSAGE,
    MAX_FRAME,
    MAX_HEADER,
    Message,
    decode,
    encode,
)

log = logging.getLogger("pslm.wire")

INTERRUPT_EVERY = 0.1
"""Seconds between two questions to a wait's ``interrupt``."""
TAKE_BATCH = 256
"""Most messages a Channel takes from one connection at a time, so that a peer sending without
pause cannot keep a wait past its deadline."""
MAX_NOTICES = 1024
"""Most unread notices a Channel keeps; beyond that the oldest are dropped."""
LOG_DROPS_EVERY = 60.0
"""Seconds between two log lines about dropped notices."""

# ZeroMQ's flags as plain ints: pyzmq's enums combine in Python code, on every message
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether ``sock`` has a message waiting (no Poller: one option read)."""
    return bool(int(sock.getsockopt(zmq.EVENTS)) & _POLLIN)


def context() -> zmq.Context[Any]:
    """The process-wide ZeroMQ context (one per process, shared by all threads)."""
    return zmq.Context.instance()


def _socket(kind: int, max_frame: int = MAX_FRAME) -> zmq.Socket[Any]:
    sock = context().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)  # closing never waits on unsent data
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)  # a larger frame drops the connection
    return sock


class Listener:
    """A bound ROUTER socket that receives requests from any number of peers.

    ``recv`` and ``send`` do not block: call ``recv`` when a ``Poller`` reports it readable.
    """

    def __init__(self, bind: str = "tcp://127.0.0.1:*", *, max_bytes: int = DEFAULT_MAX_MESSAGE):
        self.max_bytes = max_bytes
        # libzmq bounds frames, not messages (it hands over a message only once every frame is
        # in): a listener that takes no tensors takes no frame larger than a header either
        self.socket = _socket(zmq.ROUTER, MAX_FRAME if max_bytes else MAX_HEADER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to gone peers are dropped
        security = auth.current()
        try:
            if security is not None:  # only peers that prove the cluster secret get through
                security.serve(self.socket)
            self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise TransportError(f"cannot listen on {bind}: {exc}") from exc
        except BaseException:  # (a socket that fails to be set up is closed, not leaked)
            self.socket.close()
            raise
        self.address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.watch = None if security is None else auth.HandshakeWatch(self.socket, self.address)
        if self.watch is not None:
            self.watch.start()

    def recv(self) -> tuple[bytes, Message]:
        """The next (peer, message). Raises ProtocolError (with ``.sender``) for a bad message."""
        frames = self.socket.recv_multipart(copy=False)
        peer = frames[0].bytes
        try:
            msg = decode(frames[1:], max_bytes=self.max_bytes)
        except ProtocolError as exc:
            exc.sender = peer
            raise
        if self.watch is not None:  # the role its connection proved (pslm.wire.auth)
            msg.sender = str(frames[1].get("User-Id") or "")
        return peer, msg

    def send(self, peer: bytes, msg: Message, *, track: bool = False) -> Sent | None:
        """Queue ``msg`` for ``peer`` without copying tensor memory.

        With ``track=True`` returns a ``Sent`` that is done once ZeroMQ no longer reads the
        tensors' memory; until then they must not be modified.
        """
        frames = encode(msg)
        sent = Sent.watch(frames, self.socket.copy_threshold) if track else None
        try:  # never blocks: a ROUTER drops what a gone or full peer cannot take
            self.socket.send_multipart([peer, *frames], copy=False, flags=_NOBLOCK)
        except zmq.ZMQError as exc:
            raise TransportError(f"send to peer failed: {exc}") from exc
        return sent

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        self.socket.close()


class Sent:
    """Whether ZeroMQ has finished reading the memory of a message sent without copying.

        frames = encode(msg)
        sent = Sent.watch(frames, socket.copy_threshold)   # before sending the frames
        ...
        sent.done / sent.wait(timeout)

    pyzmq keeps the object it was given for a frame it does not copy alive until libzmq has
    sent that frame, then drops it (from its garbage-collector thread), so a weak reference to
    the object dies at that moment. ``watch`` puts a numpy view (which can be weakly referred
    to; a memoryview cannot) in place of the last frame pyzmq will not copy: libzmq sends and
    releases a message's frames in order, so once that one is released, all are. Frames below
    the copy threshold are copied when sent and read nothing later. (pyzmq's own tracking of a
    multipart send follows its last frame only: when that one is small, and so copied, the
    tracker is done at once while the large frames before it are still being sent.)
    """

    __slots__ = ("_ref", "_waiter")

    def __init__(self, frame: Any | None):
        waiter: list[threading.Event | None] = [None]  # (made only if someone waits)
        self._waiter = waiter

        def released(_: Any) -> None:  # pyzmq's thread: the frame is sent
            event = waiter[0]
            if event is not None:
                event.set()

        self._ref = None if frame is None else weakref.ref(frame, released)

    @classmethod
    def watch(cls, frames: list[Any], copy_threshold: int) -> Sent:
        """Watch ``frames`` (about to be sent; the list is changed in place)."""
        for i in range(len(frames) - 1, 0, -1):  # frame 0 is the header (bytes)
            frame = frames[i]
            if isinstance(frame, memoryview) and frame.nbytes >= copy_threshold:
                frames[i] = view = np.frombuffer(frame, dtype=np.uint8)
                return cls(view)
        return cls(None)  # every frame is copied when sent

    @property
    def done(self) -> bool:
        return self._ref is None or self._ref() is None

    def wait(self, timeout: float) -> bool:
        """Block until done, at most ``timeout`` seconds; whether it is done."""
        if self.done:
            return True
        self._waiter[0] = event = threading.Event()
        return self.done or event.wait(timeout)  # (released between the two checks: done)


class Connection:
    """A DEALER socket connected to one peer address."""

    def __init__(self, address: str, *, send_timeout: float, role: str = ""):
        """``role``: what this connection proves with the cluster secret (``auth.ROLES``;
        empty: the process's role, ``auth.install``)."""
        self.address = address
        self.socket = _socket(zmq.DEALER)
        self.socket.setsockopt(zmq.SNDTIMEO, max(1, int(send_timeout * 1000)))
        security = auth.current()
        try:
            if security is not None:
                (security.as_role(role) if role else security).present(self.socket)
            self.socket.connect(address)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise TransportError(f"cannot connect to {address}: {exc}") from exc
        except BaseException:  # (a socket that fails to be set up is closed, not leaked)
            self.socket.close()
            raise

    def send(self, msg: Message) -> None:
        """Queue ``msg``; blocks at most the send timeout if the peer's queue is full."""
        try:
            self.socket.send_multipart(encode(msg), copy=False)
        except zmq.Again:
            raise RequestTimeout(
                f"could not send {msg.op!r} to {self.address}: queue full"
            ) from None
        except zmq.ZMQError as exc:
            raise TransportError(f"send to {self.address} failed: {exc}") from exc

    def close(self) -> None:
        self.socket.close()


class Poller:
    """Waits on several Listeners and Connections at once."""

    def __init__(self, *endpoints: Listener | Connection):
        self._poller = zmq.Poller()
        self._by_socket: dict[Any, Listener | Connection] = {}
        for e in endpoints:
            self.add(e)

    def add(self, endpoint: Listener | Connection) -> None:
        self._poller.register(endpoint.socket, zmq.POLLIN)
        self._by_socket[endpoint.socket] = endpoint

    def remove(self, endpoint: Listener | Connection) -> None:
        self._poller.unregister(endpoint.socket)
        del self._by_socket[endpoint.socket]

    def poll(self, timeout: float) -> list[Listener | Connection]:
        """The endpoints with a message waiting, after at most ``timeout`` seconds."""
        try:
            events = self._poller.poll(max(0, int(timeout * 1000)))
        except zmq.ZMQError as exc:
            raise TransportError(f"poll failed: {exc}") from exc
        return [self._by_socket[s] for s, _ in events]


class Channel:
    """Requests to named peers, matched with their replies by id, each with a deadline.

    Not thread-safe. ``send`` returns at once; ``wait`` blocks until every named request has
    its reply, raising RequestTimeout when the deadline passes and RefusedError when a peer
    answered with an ``error`` message. Replies to requests nobody waits for any more (after a
    timeout) are dropped, and so are replies from another peer than the one asked. Messages
    with id 0 are notices a peer sent unasked; ``notices`` collects them, the newest
    MAX_NOTICES (a caller polling ``socket(name)`` itself calls ``drain(name)``).
    """

    def __init__(self, *, timeout: float, role: str = ""):
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.role = role
        """What its connections prove (``Connection``)."""
        self._conns: dict[str, Connection] = {}
        self._poller = Poller()
        self._next_id = 1
        self._pending: dict[int, str] = {}  # request id -> peer name
        self._sent: dict[int, Message] = {}  # request id -> the request, to send again
        self._replies: dict[int, Message] = {}
        self.notices: list[tuple[str, Message]] = []
        self.dropped_notices = 0
        """How many notices were dropped unread (beyond MAX_NOTICES)."""
        self._drops_logged = -LOG_DROPS_EVERY
        self.watch: Callable[[], None] | None = None
        """Called every INTERRUPT_EVERY seconds while waiting (e.g. to follow peers that moved
        and ``reroute`` to them)."""

    def connect(self, name: str, address: str) -> None:
        """Open a connection to ``address`` under ``name``, replacing any earlier one."""
        if name in self._conns:
            self.disconnect(name)
        conn = Connection(address, send_timeout=self.timeout, role=self.role)
        self._conns[name] = conn
        self._poller.add(conn)

    def disconnect(self, name: str) -> None:
        conn = self._conns.pop(name)
        self._poller.remove(conn)
        conn.close()

    def send(self, name: str, msg: Message) -> int:
        """Send a request to ``name`` and return its id. Does not wait for the reply."""
        msg.id = self._next_id
        self._next_id += 1
        self._conn(name).send(msg)
        self._pending[msg.id] = name
        self._sent[msg.id] = msg
        return msg.id

    def send_unawaited(self, name: str, msg: Message) -> None:
        """Send a request whose reply nobody waits for (it is dropped when it comes)."""
        msg.id = self._next_id
        self._next_id += 1
        self._conn(name).send(msg)

    def reroute(
        self, name: str, address: str, rewrite: Callable[[Message], Message] | None = None
    ) -> int:
        """``name`` is at ``address`` now: connect there and send it again every request to
        ``name`` still without a reply (same ids; the peer must take duplicates as such),
        through ``rewrite`` first if given (it keeps the id). Returns how many were sent
        again."""
        self.connect(name, address)
        again = [i for i, peer in self._pending.items() if peer == name and i not in self._replies]
        for i in again:
            if rewrite is not None:
                self._sent[i] = rewrite(self._sent[i])
            self._conns[name].send(self._sent[i])
        return len(again)

    def wait(
        self,
        ids: Iterable[int],
        timeout: float | None = None,
        on_reply: Callable[[int, Message], None] | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> dict[int, Message]:
        """The replies to ``ids``; blocks at most ``timeout`` (default: the channel's).

        ``on_reply(id, reply)`` is called for each successful reply as soon as it arrives, so
        its work overlaps with the replies still on their way. ``interrupt`` is asked about
        every INTERRUPT_EVERY seconds; when it says True, Interrupted is raised and the
        requests stay pending, to be waited for again (their deadline starts anew).
        """
        ids = list(dict.fromkeys(ids))  # (an id named twice is waited for once)
        names = {i: self._pending.get(i, "?") for i in ids}
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        done: set[int] = set()
        forget = True
        try:
            while True:
                for i in ids:
                    if i in self._replies and i not in done:
                        done.add(i)
                        if on_reply is not None and self._replies[i].op != "error":
                            on_reply(i, self._replies[i])
                if len(done) == len(ids):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    peers = sorted({names[i] for i in ids if i not in done})
                    raise RequestTimeout(f"no reply from {', '.join(peers)} within {limit:g} s")
                if interrupt is not None:
                    if interrupt():
                        forget = False
                        raise Interrupted("the wait was interrupted; the requests are pending")
                    left = min(left, INTERRUPT_EVERY)
                if self.watch is not None:
                    self.watch()
                    left = min(left, INTERRUPT_EVERY)
                for conn in self._poller.poll(left):
                    assert isinstance(conn, Connection)
                    self._take(conn)
            replies = {i: self._replies[i] for i in ids}
        finally:
            for i in ids if forget else ():  # late replies are dropped in _take
                self._pending.pop(i, None)
                self._replies.pop(i, None)
                self._sent.pop(i, None)
        for i, reply in replies.items():
            if reply.op == "error":
                raise RefusedError(
                    str(reply.body.get("message", "request refused")),
                    code=str(reply.body.get("code", "refused")),
                    peer=names[i],
                )
        return replies

    def request(self, name: str, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` to ``name`` and wait for its reply."""
        return self.wait([self.send(name, msg)], timeout)[msg.id]

    def socket(self, name: str) -> zmq.Socket[Any]:
        """The socket of the connection to ``name``, for callers with their own poll loop."""
        return self._conn(name).socket

    def drain(self, name: str) -> list[Message]:
        """Take what arrived from ``name`` (at most TAKE_BATCH messages: the socket stays
        readable if more wait); return and forget the notices among it."""
        self._take(self._conn(name))
        mine = [m for n, m in self.notices if n == name]
        self.notices = [(n, m) for n, m in self.notices if n != name]
        return mine

    def close(self) -> None:
        for name in list(self._conns):
            self.disconnect(name)

    def _take(self, conn: Connection) -> None:
        """Take at most TAKE_BATCH waiting messages from ``conn``: the caller checks its
        deadline between two calls."""
        sock = conn.socket
        for _ in range(TAKE_BATCH):
            if not readable(sock):  # cheaper than ending on zmq.Again
                break
            try:
                frames = sock.recv_multipart(copy=False, flags=_NOBLOCK)
            except zmq.Again:
                break
            try:
                reply = decode(frames)
            except ProtocolError as exc:
                log.warning("dropped a malformed reply from %s: %s", conn.address, exc)
                continue
            asked = self._pending.get(reply.id)
            if asked is not None and self._conns.get(asked) is conn:
                self._replies[reply.id] = reply
            elif asked is not None:  # ids are guessable: only the peer asked may answer
                log.warning("dropped reply %d from %s: asked of %s", reply.id, conn.address, asked)
            elif reply.id == 0:
                self.notices.append((self._name_of(conn), reply))
            else:
                log.debug("dropped a late reply %d from %s", reply.id, conn.address)
        self._trim_notices()

    def _trim_notices(self) -> None:
        excess = len(self.notices) - MAX_NOTICES
        if excess <= 0:
            return
        del self.notices[:excess]  # nobody reads them (or a peer floods): keep the newest
        self.dropped_notices += excess
        now = time.monotonic()
        if now - self._drops_logged >= LOG_DROPS_EVERY:  # a flood must not flood the log too
            self._drops_logged = now
            log.warning(
                "%d unread notices dropped so far, the oldest first (at most %d are kept)",
                self.dropped_notices,
                MAX_NOTICES,
            )

    def _name_of(self, conn: Connection) -> str:
        return next(n for n, c in self._conns.items() if c is conn)

    def _conn(self, name: str) -> Connection:
        try:
            return self._conns[name]
        except KeyError:
            raise TransportError(f"not connected to {name!r}") from None


def tcp_address(address: str) -> str:
    """``host:port`` or ``tcp://host:port`` as a ZeroMQ endpoint; ValueError if neither."""
    addr = address if "://" in address else f"tcp://{address}"
    scheme, _, rest = addr.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme not in ("tcp", "ipc", "inproc") or (scheme == "tcp" and not (sep and host and port)):
        raise ValueError(f"not an address: {address!r} (want host:port or tcp://host:port)")
    if scheme == "tcp" and port != "*" and not (port.isdigit() and 0 <= int(port) < 65536):
        raise ValueError(f"bad port in address {address!r}")
    return addr


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_tuned = False


def tune_allocator() -> bool:
    """Make glibc reuse freed memory for received frames instead of mapping fresh pages.

    ZeroMQ allocates every received frame; by default glibc serves large ones with a fresh mmap
    and returns them to the kernel on free, so every pull faults its pages in again. Raising
    the mmap threshold above MAX_FRAME and keeping freed memory (trim threshold) doubled
    large push/pull throughput on this machine (BENCHMARKS.md). The cost: the process keeps
    its peak heap. Process-wide and idempotent; False where there is no glibc.
    """
    global _tuned
    if _tuned:
        return True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = (
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum; frames are <= 16 MiB
        and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        and mallopt(_M_TOP_PAD, 64 << 20)
    )
    _tuned = bool(ok)
    return _tuned
