"""A node's side of the control plane: registering with the scheduler and heartbeats.

channel = Channel(timeout=30.0)
channel.connect("scheduler", "tcp://127.0.0.1:9000")
me = register(channel, role="worker", rank=-1, address="", timeout=120.0)
beat = Heartbeat("tcp://127.0.0.1:9000", me.node_id, me.heartbeat_interval,
                 lost_after=2 * me.heartbeat_timeout)
beat.start()
...
if beat.lost.is_set(): ...       # the scheduler stopped answering
beat.close()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pslm.errors import ProtocolError, PSLMError, RequestTimeout
from pslm.ps.control.table import Table
from pslm.ps.core import protocol
from pslm.ps.core.steering import Steering
from pslm.wire import auth
from pslm.wire.message import Message
from pslm.wire.transport import Channel

log = logging.getLogger("pslm.control")


@dataclass(frozen=True, slots=True)
class Membership:
    """What the scheduler told a node when the cluster was complete."""

    node_id: str
    rank: int
    num_workers: int
    num_servers: int
    servers: tuple[str, ...]
    """Server addresses, by rank."""
    heartbeat_interval: float
    heartbeat_timeout: float
    late: bool = False
    """Joined a running cluster (in place of a dead node): a worker waits for a share, a
    server starts as a backup."""
    shard: int = -1
    """Servers: the shard this one serves (as primary) or keeps a copy of (as backup)."""
    primary: bool = True
    """Servers: whether it serves ``shard`` (else it is the shard's backup)."""
    backups: tuple[str, ...] = ()
    """Backup server addresses, by shard ("" where a shard has none)."""
    epoch: str = ""
    """The scheduler's incarnation (``Heartbeat.epoch``)."""


def node_role(node_id: str) -> str:
    """The role of a node by its id (``server-1`` -> ``server``; empty if none)."""
    role = node_id.rsplit("-", 1)[0]
    return role if role in protocol.ROLES else ""


def register(channel: Channel, *, role: str, rank: int, address: str, timeout: float) -> Membership:
    """Register with the scheduler reached as ``"scheduler"`` on ``channel``.

    Blocks until the whole cluster has registered, at most ``timeout`` seconds (then
    RequestTimeout). ``rank`` -1 lets the scheduler choose.
    """
    body = {
        "role": role,
        "rank": rank,
        "address": address,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    try:
        reply = channel.request("scheduler", Message("register", body=body), timeout)
    except RequestTimeout as exc:
        if auth.current() is None:
            raise
        raise RequestTimeout(f"{exc} (a scheduler refuses a wrong cluster secret)") from None
    try:
        b = reply.body
        return Membership(
            node_id=str(b["id"]),
            rank=int(b["rank"]),
            num_workers=int(b["num_workers"]),
            num_servers=int(b["num_servers"]),
            servers=tuple(str(a) for a in b["servers"]),
            heartbeat_interval=float(b["heartbeat_interval"]),
            heartbeat_timeout=float(b["heartbeat_timeout"]),
            late=bool(b.get("late", False)),
            shard=int(b.get("shard", -1)),
            primary=bool(b.get("primary", True)),
            backups=tuple(str(a) for a in b.get("backups", ())),
            epoch=str(b.get("epoch", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed register reply from the scheduler: {exc!r}") from None


class Heartbeat(threading.Thread):
    """Sends a heartbeat every ``interval`` seconds from a thread with its own socket.

    ``lost`` is set once the scheduler has not answered for ``lost_after`` seconds;
    ``stop_requested`` once the scheduler says the cluster is shutting down.
    Thread-safe: the events may be read from any thread.
    """

    def __init__(
        self,
        scheduler: str,
        node_id: str,
        interval: float,
        *,
        lost_after: float,
        stats: Callable[[], dict[str, float]] | None = None,
    ):
        super().__init__(name=f"heartbeat-{node_id}", daemon=True)
        self.stats = stats
        """What to report with each heartbeat (numbers by name; read from this thread)."""
        self.scheduler = scheduler
        self.node_id = node_id
        self.interval = interval
        self.lost_after = lost_after
        self.lost = threading.Event()
        self.stop_requested = threading.Event()
        self.lease_version = 0
        """The version of the share leases the scheduler last reported."""
        self.epoch = ""
        """The scheduler's incarnation, as it last reported (it changes when a new scheduler
        takes over)."""
        self.table: Table | None = None
        """Where each shard is served and backed up, as the scheduler last reported."""
        self.steering: Steering | None = None
        """The job's live settings, the newest version the scheduler reported."""
        self._quit = threading.Event()

    def run(self) -> None:
        channel = Channel(timeout=self.interval, role=node_role(self.node_id))
        channel.connect("scheduler", self.scheduler)
        last_ack = time.monotonic()
        try:
            while not self._quit.is_set():
                started = time.monotonic()
                try:
                    body: dict[str, object] = {"node": self.node_id}
                    if self.stats is not None:
                        body["stats"] = self.stats()
                    reply = channel.request("scheduler", Message("heartbeat", body=body))
                    last_ack = time.monotonic()
                    self.lost.clear()
                    if reply.body.get("stop"):
                        self.stop_requested.set()
                    version = reply.body.get("leases")
                    if isinstance(version, int) and not isinstance(version, bool):
                        self.lease_version = version  # one assignment: safe to read anywhere
                    epoch = reply.body.get("epoch")
                    if isinstance(epoch, str):
                        self.epoch = epoch
                    table = Table.from_body(reply.body)
                    if table is not None:
                        self.table = table  # likewise
                    if "steering" in reply.body:
                        self.steering = Steering.from_dict(reply.body["steering"])
                except PSLMError as exc:
                    if time.monotonic() - last_ack > self.lost_after and not self.lost.is_set():
                        log.error("scheduler silent for %.1f s: %s", self.lost_after, exc)
                        self.lost.set()
                self._quit.wait(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            channel.close()

    def close(self) -> None:
        """Stop sending heartbeats; returns once the thread has ended."""
        self._quit.set()
        if self.is_alive():
            self.join(timeout=self.interval + 1.0)
