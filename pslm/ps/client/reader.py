"""A reader: the parameters of a live cluster, for a process that serves them.

    with ParameterReader("tcp://127.0.0.1:9000") as reader:
        reader.version()             # the servers' lowest version (cheap: no tensors)
        snap = reader.read()         # Snapshot: version, complete fp32 tensors by name

A reader registers nowhere and takes no part in training: no worker ever waits for it. It
asks the scheduler for the key space and the shard table (``status``), and each shard's
server for its chunks (op ``read``). ``read`` returns one complete parameter set in new
tensors: the caller can swap it in while earlier snapshots are still in use. Under BSP every
chunk of it comes from one version: the servers of a step do not update at the same instant,
so when the shards' versions differ, every server is asked for a version a little ahead, and
each answers as it applies that version (never holding up training). ``consistent`` says
whether that succeeded within ATTEMPTS rounds (it fails only when the reader is starved for
many steps); the caller reads again. Under SSP and ASP there is no common version; each
shard's part is whole, and ``version`` is the lowest.

A reader is not thread-safe: use it from one thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from pslm.errors import ClusterError, ProtocolError, PSLMError, RefusedError
from pslm.ps.control.table import Table
from pslm.ps.core import protocol
from pslm.ps.core.keyspace import KeySpace
from pslm.wire.message import Message
from pslm.wire.transport import Channel, tcp_address

log = logging.getLogger("pslm.reader")

ATTEMPTS = 8
"""Rounds ``read`` spends making a BSP snapshot agree on one version."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A complete parameter set read from the servers."""

    version: int
    """The lowest of the shards' versions (under BSP: the version of all of it)."""
    versions: tuple[int, ...]
    """Each shard's version."""
    tensors: dict[str, torch.Tensor]
    synchronous: bool
    """The cluster runs BSP (or local SGD): the snapshot is one version throughout."""

    @property
    def consistent(self) -> bool:
        return len(set(self.versions)) == 1


class ParameterReader:
    """Read-only access to a running cluster's parameters."""

    def __init__(self, scheduler: str, *, timeout: float = 30.0):
        try:
            self.scheduler = tcp_address(scheduler)
        except ValueError as exc:
            raise ClusterError(str(exc)) from None
        self.channel = Channel(timeout=timeout, role="reader")
        self.channel.connect("scheduler", self.scheduler)
        self.keyspace: KeySpace | None = None
        self.servers: list[str] = []
        self._table = -1

    def status(self) -> dict[str, Any]:
        """The scheduler's ``status`` reply: nodes, run directory, shard table."""
        return dict(self.channel.request("scheduler", Message("status")).body)

    def version(self) -> int:
        """The lowest version among the shards' servers."""
        self._follow()
        return min(v for v, _ in self._ask(self._shards(), 0, None).values())

    def read(self) -> Snapshot:
        """One complete parameter set (see the module's description)."""
        ks = self._follow()
        out = {t.name: torch.empty(t.shape, dtype=torch.float32) for t in ks.tensors}
        everyone = list(self._shards())
        got = self._ask(everyone, 0, out)
        versions = {s: v for s, (v, _) in got.items()}
        synchronous = all(sync for _, sync in got.values())
        lead = 1
        for _ in range(ATTEMPTS if synchronous else 0):
            if len(set(versions.values())) == 1:
                break
            # Every shard is asked for one version ahead of the newest seen: each server
            # answers the moment it applies that version, so all answers agree unless a
            # server was past it already (the reader was slow): then ahead by more.
            target = max(versions.values()) + lead
            try:
                versions = {s: v for s, (v, _) in self._ask(everyone, target, out).items()}
            except RefusedError as exc:
                if exc.code != "bad_clock":
                    raise
                versions = {s: v for s, (v, _) in self._ask(everyone, 0, out).items()}
            lead = min(2 * lead, protocol.READ_AHEAD)
        ordered = tuple(versions[s] for s in everyone)
        return Snapshot(min(ordered), ordered, out, synchronous)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ParameterReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- helpers ----------------------------------------------------------------------------

    def _shards(self) -> range:
        return range(len(self.servers))

    def _follow(self) -> KeySpace:
        """The key space, and connections to the servers the shard table names now."""
        body = self.status()
        table = Table.from_body(body)
        if table is None or not table.servers:
            raise ProtocolError("the scheduler's status carries no shard table")
        if table.version != self._table:
            if len(table.servers) != len(self.servers) and self.servers:
                raise ClusterError("the cluster's number of shards changed")
            for s, address in enumerate(table.servers):
                if not address:
                    raise ClusterError(f"shard {s} has no server now")
                if s == len(self.servers):
                    self.channel.connect(f"server-{s}", address)
                    self.servers.append(address)
                elif address != self.servers[s]:
                    self.channel.reroute(f"server-{s}", address)
                    self.servers[s] = address
            self._table = table.version
        if self.keyspace is None:
            raw = self.channel.request("scheduler", Message("keyspace")).body.get("keyspace")
            if not isinstance(raw, dict):
                raise ProtocolError("the scheduler sent no key space")
            ks = KeySpace.from_dict(raw)
            if ks.num_servers != len(self.servers):
                raise ProtocolError("the key space does not match the shard table")
            self.keyspace = ks
        return self.keyspace

    def _ask(
        self, shards: Any, min_version: int, out: dict[str, torch.Tensor] | None
    ) -> dict[int, tuple[int, bool]]:
        """Read ``shards`` (every chunk into ``out``; None: the versions alone); returns
        shard -> (version, synchronous)."""
        assert self.keyspace is not None
        ks = self.keyspace
        ids = {}
        for s in shards:
            keys = [c.key for c in ks.shard(s)] if out is not None else []
            body = {"keys": keys, "min_version": min_version}
            ids[self.channel.send(f"server-{s}", Message("read", body=body))] = s
        result = {}
        for rid, reply in self.channel.wait(ids).items():
            s = ids[rid]
            version = reply.body.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise ProtocolError(f"server-{s}: read reply without a version")
            chunks = ks.shard(s) if out is not None else []
            if len(reply.tensors) != len(chunks):
                raise ProtocolError(
                    f"server-{s}: read reply has {len(reply.tensors)} tensors, "
                    f"expected {len(chunks)}"
                )
            for chunk, t in zip(chunks, reply.tensors, strict=True):
                if t.dim() != 1 or t.numel() != chunk.length or not t.is_floating_point():
                    raise ProtocolError(f"server-{s}: chunk {chunk.key} has the wrong size")
                assert out is not None
                name = ks.tensors[chunk.tensor].name
                out[name].view(-1)[chunk.offset : chunk.offset + chunk.length].copy_(t)
            result[s] = (version, reply.body.get("synchronous") is not False)
        return result


class SchedulerLink:
    """Requests to a cluster's scheduler (``status``, ``ctl``) from any thread: one at a time,
    on one socket, opened again after a failure (no stale replies)."""

    def __init__(self, address: str, timeout: float = 5.0):
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channel: Channel | None = None

    def request(self, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            if self._channel is None:
                self._channel = Channel(timeout=self.timeout, role="reader")
                self._channel.connect("scheduler", self.address)
            try:
                return dict(self._channel.request("scheduler", Message(op, body=body or {})).body)
            except PSLMError:
                self._channel.close()  # a fresh socket next time (no stale replies)
                self._channel = None
                raise
