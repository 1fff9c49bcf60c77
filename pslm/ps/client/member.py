"""A worker as a member of the cluster: registered with the scheduler, sending heartbeats,
meeting the other workers at barriers, holding shares of the global batch, hearing the live
settings. ``PSClient`` (``pslm.ps.client.client``) adds the parameter traffic to it.

    member = ClusterMember(ClientConfig(scheduler="tcp://127.0.0.1:9000"))   # blocks: register
    member.barrier("eval-7", {"loss": 3.2})      # blocks until every worker arrived
    member.close()                               # blocks until every worker is done

Every call says whether it blocks. Not thread-safe but where said (cheap reads of what the
heartbeats brought).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from pslm.errors import ClusterError, ConfigError
from pslm.ps.control.leases import Leases
from pslm.ps.control.node import Heartbeat, Membership, register
from pslm.ps.core.steering import Steering
from pslm.wire.message import Message
from pslm.wire.transport import Channel, tcp_address, tune_allocator


@dataclass(kw_only=True, slots=True)
class ClientConfig:
    """Settings of a worker's client."""

    scheduler: str
    """Address of the scheduler (host:port or tcp://host:port)."""
    rank: int = -1
    """Requested worker rank; -1 lets the scheduler choose."""
    timeout: float = 60.0
    """Seconds a request may wait for its reply (a BSP pull waits for the slowest worker)."""
    register_timeout: float = 120.0
    """Seconds to wait for the whole cluster to register."""
    tune_allocator: bool = True
    """Let glibc keep and reuse freed memory, which doubles large pull throughput
    (``pslm.wire.transport.tune_allocator``); process-wide."""

    def __post_init__(self) -> None:
        try:
            self.scheduler = tcp_address(self.scheduler)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.timeout <= 0 or self.register_timeout <= 0:
            raise ConfigError("timeouts must be positive")


class ClusterMember:
    """A worker registered with the scheduler. Creating one registers and blocks until the
    whole cluster has registered (at most ``register_timeout``)."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        if cfg.tune_allocator:
            tune_allocator()
        self.channel = Channel(timeout=cfg.timeout, role="worker")
        self.channel.connect("scheduler", cfg.scheduler)
        try:
            self.me: Membership = register(
                self.channel,
                role="worker",
                rank=cfg.rank,
                address="",
                timeout=cfg.register_timeout,
            )
            for r, addr in enumerate(self.me.servers):
                self.channel.connect(f"server-{r}", addr)
            self._stats: dict[str, float] = {}
            self.heartbeat = Heartbeat(
                cfg.scheduler,
                self.me.node_id,
                self.me.heartbeat_interval,
                lost_after=2 * self.me.heartbeat_timeout,
                stats=lambda: dict(self._stats),
            )
            self.heartbeat.start()
        except BaseException:
            self.channel.close()
            raise
        self._closed = False
        self._steering = Steering()

    @property
    def rank(self) -> int:
        return self.me.rank

    @property
    def num_workers(self) -> int:
        return self.me.num_workers

    @property
    def num_servers(self) -> int:
        return self.me.num_servers

    @property
    def late(self) -> bool:
        """Whether this worker joined a running cluster (in place of a dead one)."""
        return self.me.late

    @property
    def lease_version(self) -> int:
        """The version of the share leases the scheduler last reported (via heartbeats):
        when it changes, ``leases()`` tells what changed. Cheap; any thread."""
        return self.heartbeat.lease_version

    def barrier(
        self, name: str = "", values: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Block until every worker has reached the barrier ``name``; return ``values`` summed
        over all workers (an all-reduce of a few numbers, e.g. evaluation losses)."""
        self._check_alive()
        body = {
            "node": self.me.node_id,
            "name": name,
            "group": "workers",
            "values": {k: float(v) for k, v in (values or {}).items()},
        }
        reply = self.channel.request("scheduler", Message("barrier", body=body))
        sums = reply.body.get("values", {})
        return {str(k): float(v) for k, v in sums.items()} if isinstance(sums, dict) else {}

    def leases(self) -> Leases:
        """Who holds each share of the global batch now (``pslm.ps.control.leases``). Blocks
        for one round trip to the scheduler."""
        self._check_alive()
        reply = self.channel.request("scheduler", Message("leases", body={"node": self.me.node_id}))
        return Leases.from_body(reply.body)

    def release(self, share: int, clock: int) -> Leases:
        """Let ``share`` go to the worker it is moving to, which pushes it from ``clock`` (this
        worker pushed it up to ``clock`` - 1). Blocks for one round trip."""
        self._check_alive()
        body = {"node": self.me.node_id, "share": share, "clock": clock}
        return Leases.from_body(
            self.channel.request("scheduler", Message("release", body=body)).body
        )

    def steering(self, version: int | None = None) -> Steering:
        """The newest version of the job's live settings this worker has heard of (from the
        scheduler's notices and heartbeats; cheap, does not block), or with ``version`` that
        version, asked of the scheduler (blocks for one round trip)."""
        if version is not None:
            body = {"version": version}
            reply = self.channel.request("scheduler", Message("steering", body=body))
            return Steering.from_dict(reply.body.get("steering"))
        for notice in self.channel.drain("scheduler"):
            if notice.op == "steering":
                doc = Steering.from_dict(notice.body)
                if doc.version > self._steering.version:
                    self._steering = doc
        beat = self.heartbeat.steering
        if beat is not None and beat.version > self._steering.version:
            self._steering = beat
        return self._steering

    def report(self, name: str, value: float) -> None:
        """A number the heartbeats report to the scheduler from now on (``pslm ctl status``
        shows them). At once."""
        self._stats[name] = value

    def close(self, *, finalize: bool = True) -> None:
        """Tell the scheduler this worker is done (blocks until every worker is) and disconnect.
        The servers shut down once every worker has closed.

        ``finalize=False`` disconnects at once, saying nothing: as a failed worker leaves
        (the job is not complete; the scheduler finds it silent)."""
        if self._closed:
            return
        stopping = self.heartbeat.stop_requested.is_set() or self.heartbeat.lost.is_set()
        if not finalize or stopping:  # the cluster is stopping (or gone): nothing to wait for
            self._disconnect()
            return
        try:
            self.channel.request("scheduler", Message("finalize", body={"node": self.me.node_id}))
        finally:
            self._disconnect()

    def _disconnect(self) -> None:
        self._closed = True
        self.heartbeat.close()
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # a failed worker does not finalize: the job is not complete
        self.close(finalize=kind is None)

    def _check_alive(self) -> None:
        if self._closed:
            raise ClusterError("this client is closed")
        if self.heartbeat.lost.is_set():
            raise ClusterError(f"lost contact with the scheduler at {self.cfg.scheduler}")
