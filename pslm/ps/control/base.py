"""What the scheduler's parts share: its settings, its state, and the steps one part takes
on behalf of another. ``Scheduler`` (``scheduler.py``) is made of ``Churn`` (nodes that die
and come back, ``churn.py``), ``Operations`` (live control and the end of a job,
``operations.py``) and the loop itself; they declare here what they use of each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pslm.errors import ConfigError
from pslm.ps.control.barriers import Barriers
from pslm.ps.control.leases import ShareLeases
from pslm.ps.control.records import NodeRecord
from pslm.ps.control.table import ShardTable
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.steering import SteeringLog
from pslm.wire.message import Message
from pslm.wire.transport import Listener, tcp_address


@dataclass(kw_only=True, slots=True)
class SchedulerConfig:
    """Settings of the scheduler process."""

    num_workers: int
    """Workers the cluster waits for before it starts."""
    num_servers: int
    """Servers the cluster waits for before it starts."""
    bind: str = "tcp://127.0.0.1:*"
    """Address to listen on (``*`` as port: any free port)."""
    run_dir: str | None = None
    """If set, ``cluster.json`` is kept up to date here."""
    address_file: str | None = None
    """If set, the bound address is written here once listening (for launchers)."""
    heartbeat_interval: float = 1.0
    """Seconds between a node's heartbeats."""
    heartbeat_timeout: float = 5.0
    """Seconds of silence after which a node is declared dead."""
    startup_timeout: float = 120.0
    """Seconds to wait for the whole cluster to register."""
    shutdown_timeout: float = 10.0
    """Seconds to wait for servers to leave after being told to shut down."""
    replicas: int = 0
    """Backups per shard (0 or 1): each is a server process of its own that keeps a copy of
    the shard and takes over when the shard's server dies."""
    steering: str = ""
    """The job's live settings to start from (JSON of ``pslm.ps.core.steering.Steering``: a run
    resumed from a checkpoint keeps what ``pslm ctl`` set before)."""
    recover: bool = False
    """Take over a running cluster from the state a previous scheduler kept in ``run_dir``
    (it died; this one listens at its address): the nodes go on without registering again."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.num_servers < 1:
            raise ConfigError("a cluster needs at least one worker and one server")
        if self.replicas not in (0, 1):
            raise ConfigError(f"replicas must be 0 or 1, got {self.replicas}")
        if self.recover and not self.run_dir:
            raise ConfigError("--recover needs the run directory the state was kept in")
        if self.steering:
            try:
                SteeringLog.start(json.loads(self.steering))
            except ValueError:
                raise ConfigError("--steering is not valid JSON") from None
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ConfigError("need 0 < heartbeat_interval < heartbeat_timeout")
        if self.startup_timeout <= 0 or self.shutdown_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        try:
            self.bind = tcp_address(self.bind)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


class SchedulerState:
    """The scheduler's state, as its parts see it (set by ``Scheduler.__init__``)."""

    cfg: SchedulerConfig
    listener: Listener
    nodes: dict[str, NodeRecord]
    """Every node once ranked, by node id."""
    leases: ShareLeases
    shards: ShardTable[NodeRecord]
    barriers: Barriers
    parked: list[tuple[NodeRecord, Message]]
    """Late workers waiting for a rank."""
    finalizing: dict[str, tuple[bytes, Message]]
    """Workers that finalized, waiting for the others (node id -> their request)."""
    told_stop: set[str]
    """Nodes that heard the cluster is stopping."""
    keyspace: KeySpace | None
    complete: bool
    stopping_since: float | None
    exit_code: int
    steering: SteeringLog
    """The job's live settings, by version (``pslm ctl``)."""
    added_workers: int
    """Workers asked of the launcher (``pslm ctl add-worker``), in cluster.json."""
    joined_added: int
    """How many of them have joined."""
    outbox: list[tuple[bytes, Message]]
    """What this turn of the loop sends once the state it follows from is on disk."""

    def _send(self, peer: bytes, msg: Message) -> None:
        """Send ``msg`` to ``peer`` at the end of this turn of the loop, after the files are
        written: a reply never tells of a change that a restarted scheduler would not know."""
        self.outbox.append((peer, msg))

    def _changed(self) -> None:
        """The state changed: the files are written at the end of this turn, before anything
        is sent."""
        raise NotImplementedError

    def _node(self, msg: Message) -> NodeRecord:
        raise NotImplementedError

    def _excuse(self, node_id: str) -> None:
        raise NotImplementedError

    def _membership(self, node: NodeRecord, msg: Message, *, late: bool = False) -> Message:
        raise NotImplementedError

    def _stop(self, why: str) -> None:
        raise NotImplementedError

    def _finish_if_done(self) -> None:
        raise NotImplementedError

    def _server_died(self, node: NodeRecord, why: str, *, left: bool = False) -> None:
        raise NotImplementedError

    def _worker_died(self, node: NodeRecord, why: str) -> None:
        raise NotImplementedError

    def _trainers(self) -> list[int]:
        raise NotImplementedError

    def _rebalance(self) -> None:
        raise NotImplementedError
