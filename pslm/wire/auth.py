"""Who may talk to a cluster: a shared secret, proved when a connection opens (ZeroMQ ZAP).

    install(Security.from_secret("a-long-random-secret"))   # process-wide, before any socket
    install(Security.from_secret(secret, encrypt=True))     # the same, and traffic encrypted
    install(None)                                           # no authentication

Once installed, every listener (the scheduler's and the servers' ROUTER sockets) accepts a
connection only from a peer that proves the secret, and every connection this process opens
proves it. A refused peer's messages never reach the request loop; the refusal is logged (at
most once a minute per address). Two mechanisms:

- PLAIN (the default with a secret): the peer presents the secret when it connects (a secret
  longer than PLAIN's 255 bytes: its SHA-256). Cheap, but the secret crosses the network in
  clear: fine on loopback or a trusted network.
- CURVE (``encrypt``): both sides' key pairs are derived from the secret (HMAC-SHA256), so
  whoever knows the secret can connect and nobody else can, and every byte is encrypted.
  Encryption costs throughput (``pslm bench transport`` measures it).

Each process proves a role as well as the secret (``Security.role``; ZeroMQ's User-Id of
every message it sends): its own key pair (CURVE) or password (PLAIN), derived from the secret
and the role. A listener learns it per connection (``Message.sender``), so that what a peer
may ask depends on what it is (``pslm.ps.core.protocol.ALLOWED``): a worker's bug cannot send
a server's ``norm`` or stop the scheduler. Every role holds the secret, so this separates
roles against mistakes, not against someone who has the secret.

The check runs in one thread per process, answering ZeroMQ's authentication requests
(RFC 27/ZAP) on ``inproc://zeromq.zap.01``.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from pslm.errors import ConfigError

log = logging.getLogger("pslm.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ROLES = ("scheduler", "server", "worker", "reader", "operator")
"""What a process may prove: a cluster role, ``reader`` (``pslm serve`` following a job) or
``operator`` (``pslm ctl``, the launcher)."""
MIN_SECRET = 16
MAX_PLAIN = 255
"""Longest password ZeroMQ's PLAIN mechanism carries, in bytes."""
LOG_EVERY = 60.0
"""Seconds between two log lines about refusals from one address."""


@dataclass(frozen=True, slots=True)
class Security:
    """The cluster secret and how it is proved."""

    secret: bytes
    encrypt: bool = False
    role: str = "operator"
    """The role this process proves when it connects (``ROLES``)."""

    @classmethod
    def from_secret(
        cls, secret: str | bytes, *, encrypt: bool = False, role: str = "operator"
    ) -> Security:
        raw = secret.encode() if isinstance(secret, str) else secret
        raw = raw.strip()
        if len(raw) < MIN_SECRET:
            raise ConfigError(f"the cluster secret needs at least {MIN_SECRET} characters")
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return cls(raw, encrypt, role)

    def as_role(self, role: str) -> Security:
        """The same secret, proving ``role``."""
        return Security.from_secret(self.secret, encrypt=self.encrypt, role=role)

    def _keypair(self, role: bytes) -> tuple[bytes, bytes]:
        """(public, secret) CURVE keys, Z85, derived from the secret for ``role``."""
        seed = hmac.new(self.secret, b"pslm-curve-" + role, hashlib.sha256).digest()
        secret = z85.encode(seed)
        return zmq.curve_public(secret), secret

    def password(self, role: str) -> bytes:
        """What PLAIN presents for ``role``: a digest of the secret and the role (hex, 64
        bytes: within PLAIN's 255 whatever the secret's length)."""
        return (
            hmac.new(self.secret, b"pslm-plain-" + role.encode(), hashlib.sha256)
            .hexdigest()
            .encode()
        )

    @property
    def domain(self) -> bytes:
        """The ZAP domain of listeners serving this secret (a digest, not the secret)."""
        tag = b"curve" if self.encrypt else b"plain"
        return hashlib.sha256(b"pslm-domain-" + tag + self.secret).hexdigest()[:32].encode()

    def serve(self, sock: zmq.Socket[Any]) -> None:
        """Make a listening socket demand the secret (call before bind)."""
        _handler_for(self)
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain)
        if self.encrypt:
            public, secret = self._keypair(b"server")
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        else:
            sock.setsockopt(zmq.PLAIN_SERVER, 1)

    def present(self, sock: zmq.Socket[Any]) -> None:
        """Make a connecting socket prove the secret (call before connect)."""
        if self.encrypt:
            server_public, _ = self._keypair(b"server")
            public, secret = self._keypair(b"client-" + self.role.encode())
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        else:
            sock.setsockopt(zmq.PLAIN_USERNAME, self.role.encode())
            sock.setsockopt(zmq.PLAIN_PASSWORD, self.password(self.role))

    def allows(self, mechanism: bytes, credentials: list[bytes]) -> str | None:
        """The role a peer's credentials prove with the secret, or None (constant-time
        comparisons)."""
        if self.encrypt:
            if mechanism != b"CURVE" or len(credentials) != 1:
                return None
            for role in ROLES:
                expected = z85.decode(self._keypair(b"client-" + role.encode())[0])
                if _same(credentials[0], expected):
                    return role
            return None
        if mechanism != b"PLAIN" or len(credentials) != 2:
            return None
        role = credentials[0].decode(errors="replace")
        if role not in ROLES:
            return None
        return role if _same(credentials[1], self.password(role)) else None


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


_current: Security | None = None
_handler: _ZapHandler | None = None
_lock = threading.Lock()


def install(security: Security | None) -> None:
    """Use ``security`` for every socket this process opens from now on (None: none).
    Listeners opened before keep the secret they were opened with."""
    global _current
    _current = security


def _handler_for(security: Security) -> None:
    """Start the process's ZAP handler if needed and let it check ``security``'s domain."""
    global _handler
    with _lock:
        if _handler is None:
            _handler = _ZapHandler()
            _handler.start()
            atexit.register(_handler.close)
        _handler.domains[security.domain] = security


def current() -> Security | None:
    """What ``install`` set."""
    return _current


def refusals() -> int:
    """How many connections this process has refused so far."""
    return _handler.refused if _handler is not None else 0


class _ZapHandler(threading.Thread):
    """Answers ZeroMQ's authentication requests for this process's listeners."""

    def __init__(self) -> None:
        super().__init__(name="pslm-zap", daemon=True)
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self._quit = threading.Event()
        self._logged: dict[str, float] = {}
        self.refused = 0
        self.domains: dict[bytes, Security] = {}

    def run(self) -> None:
        try:
            while not self._quit.is_set():
                if self.sock.poll(100):
                    self._answer(self.sock.recv_multipart())
        except zmq.ContextTerminated:
            pass
        finally:
            self.sock.close()

    def close(self) -> None:
        self._quit.set()
        if self.is_alive():
            self.join(timeout=1.0)

    def _answer(self, frames: list[bytes]) -> None:
        if len(frames) < 6:  # not a ZAP request: answer nothing sensible, refuse
            self.sock.send_multipart([b"1.0", b"", b"400", b"malformed request", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        security = self.domains.get(domain)
        role = None if security is None else security.allows(mechanism, frames[6:])
        if role is None:
            self.refused += 1
            self._log(address.decode(errors="replace"), mechanism.decode(errors="replace"))
        status = [b"200", b"OK"] if role else [b"400", b"wrong or missing cluster secret"]
        user = (role or "").encode()  # the User-Id of every message of the connection
        self.sock.send_multipart([version, request_id, *status, user, b""])

    def _log(self, address: str, mechanism: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(address, -LOG_EVERY) >= LOG_EVERY:
            self._logged[address] = now
            log.warning(
                "refused a connection from %s (%s): wrong cluster secret", address, mechanism
            )


FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class HandshakeWatch(threading.Thread):
    """Logs connections a listener refused before any secret was checked: peers that present
    none, or another mechanism (``zmq`` monitor events)."""

    def __init__(self, sock: zmq.Socket[Any], where: str):
        super().__init__(name="pslm-handshakes", daemon=True)
        self.where = where
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(FAILED)
        self._quit = threading.Event()
        self.refused = 0
        self._last = -LOG_EVERY

    def run(self) -> None:
        try:
            while not self._quit.is_set():
                if self.monitor.poll(100):
                    event = recv_monitor_message(self.monitor)
                    if event["event"] & FAILED:
                        self._refused()
        except zmq.ZMQError:
            pass
        finally:
            self.monitor.close()

    def _refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last >= LOG_EVERY:
            self._last = now
            log.warning(
                "refused a connection on %s: the peer did not prove the cluster secret "
                "(it presented none, or another mechanism or key)",
                self.where,
            )

    def close(self) -> None:
        self._quit.set()
        if self.is_alive():
            self.join(timeout=1.0)
