"""The scheduler: membership, heartbeats, barriers, the key-partition table, shutdown.

    cfg = SchedulerConfig(num_workers=2, num_servers=2, run_dir="runs/demo")
    Scheduler(cfg).run()          # blocks until the cluster has shut down; returns exit code

It waits until ``num_servers`` servers and ``num_workers`` workers have registered, then answers
every registration with the node's rank and the server addresses. From then on it records
heartbeats (a node silent for ``heartbeat_timeout`` is dead, in ``cluster.json``), runs
barriers, keeps the key space the workers declared, and shuts the servers down once every
worker has finalized. It also keeps the leases of the shares of every global batch
(``pslm.ps.control.leases``): a dead worker's shares go to live workers at once, and a worker that
registers late - a dead one restarted - takes the dead one's rank and gets a share back at a
clock boundary. Ops: ``protocol``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pslm.errors import ClusterError, ConfigError, ProtocolError
from pslm.ps.control.leases import ShareLeases
from pslm.ps.control.table import ShardTable
from pslm.ps.core import protocol
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.steering import SteeringLog
from pslm.wire.message import Message
from pslm.wire.transport import Listener, Poller, tcp_address

log = logging.getLogger("pslm.scheduler")


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


@dataclass(slots=True)
class NodeRecord:
    role: str
    requested_rank: int
    address: str
    pid: int
    host: str
    peer: bytes
    rank: int = -1
    state: str = "registering"
    last_seen: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.time)
    stats: dict[str, float] = field(default_factory=dict)
    """What the node reported with its last heartbeat (a server: bytes in and out, ...)."""

    @property
    def id(self) -> str:
        return f"{self.role}-{self.rank}"

    @property
    def live(self) -> bool:
        return self.state == "alive"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "rank": self.rank,
            "address": self.address,
            "pid": self.pid,
            "host": self.host,
            "state": self.state,
            "last_heartbeat": round(self.last_heartbeat, 3),
            "stats": self.stats,
        }


@dataclass(slots=True)
class Barrier:
    group: str
    members: set[str] = field(default_factory=set)
    """Who must arrive: the group's live nodes when the barrier began (workers: those holding
    shares), less those that die or leave meanwhile."""
    waiting: dict[str, Message] = field(default_factory=dict)  # node id -> request
    peers: dict[str, bytes] = field(default_factory=dict)
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # node id -> values

    def sums(self, members: list[NodeRecord]) -> dict[str, float]:
        """Every value summed over the members, in rank order (the same sum every run)."""
        out: dict[str, float] = {}
        for node in sorted(members, key=lambda n: (n.role, n.rank)):
            for name, value in self.values.get(node.id, {}).items():
                out[name] = out.get(name, 0.0) + value
        return out


MAX_VALUES = 64
MAX_PID = 2**31 - 1
"""The largest process id a node may report (``pid_t`` is 32 bits; Linux stops at 2**22)."""
STATE_FILE = "scheduler-state.json"
"""In the run directory: what a restarted scheduler takes over (``--recover``)."""
RELEASED_KEPT = 64
"""Released barriers whose sums are kept, for a member that arrives after the release."""


class Scheduler:
    """The scheduler's state and request loop. Single-threaded."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.listener = Listener(cfg.bind, max_bytes=0)  # control messages carry no tensors
        self.address = self.listener.address
        self.nodes: dict[str, NodeRecord] = {}  # by node id once ranked
        self.joining: list[tuple[NodeRecord, Message]] = []
        self.barriers: dict[str, Barrier] = {}
        self.finalizing: dict[str, tuple[bytes, Message]] = {}
        self.leases = ShareLeases(cfg.num_workers)
        self.shards: ShardTable[NodeRecord] = ShardTable(cfg.num_servers)
        self.parked: list[tuple[NodeRecord, Message]] = []  # late workers awaiting a rank
        self.told_stop: set[str] = set()  # nodes that heard the cluster is stopping
        self.released: dict[str, dict[str, float]] = {}  # the last barriers' sums, by name
        self.keyspace: KeySpace | None = None
        self.declared_by = ""
        self.started = time.monotonic()
        self.complete = False
        self.stopping_since: float | None = None
        self.exit_code = 0
        self.steering = SteeringLog.start(json.loads(cfg.steering) if cfg.steering else None)
        self.added_workers = 0
        """Workers asked of the launcher (``pslm ctl add-worker``), in cluster.json."""
        self.joined_added = 0
        """How many of them have joined."""
        """The job's live settings, by version (``pslm ctl``)."""
        self.epoch = secrets.token_hex(8)
        """This scheduler's incarnation: a node that sees it change re-sends its requests."""
        if cfg.recover:
            self._recover()
        elif cfg.run_dir:  # another cluster's, in this run directory before
            (Path(cfg.run_dir) / STATE_FILE).unlink(missing_ok=True)
        if cfg.address_file:
            try:
                _write_atomic(Path(cfg.address_file), self.address)
            except OSError as exc:
                self.listener.close()
                raise ConfigError(f"cannot write {cfg.address_file}: {exc.strerror}") from None
        self._write_cluster()
        log.info("scheduler listening on %s", self.address)

    def run(self) -> int:
        """Serve until the cluster has shut down; return the process exit code."""
        poller = Poller(self.listener)
        handlers = {
            "register": self._register,
            "heartbeat": self._heartbeat,
            "barrier": self._barrier,
            "declare": self._declare,
            "keyspace": self._keyspace,
            "finalize": self._finalize,
            "leave": self._leave,
            "shutdown": self._shutdown,
            "status": self._status,
            "leases": self._leases,
            "backup": self._backup,
            "release": self._release,
            "ctl": self._ctl,
            "steering": self._steering,
        }
        try:
            while not self._done():
                for _ in poller.poll(min(0.2, self.cfg.heartbeat_interval)):
                    self._serve_one(handlers)
                self._check_health()
        finally:
            self._write_cluster()
            self.listener.close()
        return self.exit_code

    def _serve_one(self, handlers: dict[str, Any]) -> None:
        try:
            peer, msg = self.listener.recv()
        except ProtocolError as exc:
            log.warning("bad message: %s", exc)
            if exc.sender is not None and exc.request_id is not None:
                self.listener.send(exc.sender, protocol.error(exc.request_id, "protocol", str(exc)))
            return
        handler = handlers.get(msg.op)
        if handler is None:
            self.listener.send(peer, protocol.error(msg, "unknown_op", f"unknown op {msg.op!r}"))
            return
        try:
            reply = handler(peer, msg)
        except (ProtocolError, ConfigError, ClusterError) as exc:
            reply = protocol.error(msg, getattr(exc, "code", "refused"), str(exc))
        except Exception as exc:  # a bug or a full disk must not take the cluster down
            log.exception("internal error on %r", msg.op)
            reply = protocol.error(msg, "internal", f"internal scheduler error: {exc!r}")
        if reply is not None:
            self.listener.send(peer, reply)

    # --- membership -------------------------------------------------------------------------

    def _register(self, peer: bytes, msg: Message) -> Message | None:
        role = protocol.field(msg, "role", str)
        if role not in protocol.ROLES:
            raise ProtocolError(f"register: role must be one of {protocol.ROLES}, got {role!r}")
        if self.complete and role == "server" and not self.cfg.replicas:
            raise ClusterError(
                f"the cluster is complete ({self.cfg.num_servers} servers, "
                f"{self.cfg.num_workers} workers) and has no backups; a server cannot join it"
            )
        pid = protocol.field(msg, "pid", int)
        if not 1 <= pid <= MAX_PID:  # (0 and -1 would always look alive to os.kill)
            raise ProtocolError(f"register: pid {pid} is not a process id (1 to {MAX_PID})")
        node = NodeRecord(
            role=role,
            requested_rank=protocol.field(msg, "rank", int, -1),
            address=protocol.field(msg, "address", str, ""),
            pid=pid,
            host=protocol.field(msg, "host", str, ""),
            peer=peer,
        )
        limit = self._size(role)
        if not -1 <= node.requested_rank < limit:
            raise ClusterError(f"{role} rank {node.requested_rank} is out of range [0, {limit})")
        if role == "server":
            try:
                tcp_address(node.address)
            except ValueError as exc:
                raise ProtocolError(f"register: {exc}") from None
        if self.complete:
            return self._join(node, msg) if role == "worker" else self._join_server(node, msg)

        def clash(taken: list[NodeRecord]) -> bool:
            return node.requested_rank >= 0 and node.requested_rank in {
                n.requested_rank for n in taken
            }

        taken = [n for n, _ in self.joining if n.role == role]
        if clash(taken) or len(taken) >= limit:  # a node that died meanwhile may hold the place
            self._drop_gone_joiners(role)
            taken = [n for n, _ in self.joining if n.role == role]
        if clash(taken):
            raise ClusterError(f"{role} rank {node.requested_rank} is already taken")
        if len(taken) >= limit:
            raise ClusterError(f"already {limit} {role}s registered")
        self.joining.append((node, msg))
        log.info("%s registered from %s (%d/%d)", role, node.host, len(taken) + 1, limit)
        if len(self.joining) == self._size("server") + self.cfg.num_workers:
            self._start_cluster()
        return None  # answered when the cluster is complete

    def _drop_gone_joiners(self, role: str) -> None:
        """Forget the registrations of ``role``, still waiting for the cluster to fill, whose
        process is gone (on this host: elsewhere a process cannot be looked at, and nodes send
        no heartbeats before they are members), so that a node that died meanwhile leaves its
        place to its restart. Each is told (if it lives after all, where pids are not this
        host's, it hears why instead of waiting for the cluster)."""
        here = socket.gethostname()
        kept = []
        for node, msg in self.joining:
            if node.role == role and node.host == here and not _pid_alive(node.pid):
                why = f"{role} registration (rank {node.requested_rank}, pid {node.pid}) dropped"
                log.warning("%s: its process is gone", why)
                told = (
                    f"{why}: host {here} has no such process; a node in another pid namespace "
                    "(a container) needs a host name of its own"
                )
                self.listener.send(node.peer, protocol.error(msg, "gone", told))
                continue
            kept.append((node, msg))
        self.joining = kept

    def _size(self, role: str) -> int:
        """Processes of ``role``: a server per shard, and as many backups with replicas."""
        if role == "server":
            return self.cfg.num_servers * (1 + self.cfg.replicas)
        return self.cfg.num_workers

    def _start_cluster(self) -> None:
        for role in protocol.ROLES:
            members = [n for n, _ in self.joining if n.role == role]
            free = sorted(set(range(self._size(role))) - {n.requested_rank for n in members})
            for n in members:
                n.rank = n.requested_rank if n.requested_rank >= 0 else free.pop(0)
        for node, _ in sorted(self.joining, key=lambda j: (j[0].role, j[0].rank)):
            node.state = "alive"
            node.last_seen = time.monotonic()
            self.nodes[node.id] = node
            if node.role == "server":  # ranks past the shards are backups, one per shard
                self.shards.place(node.rank % self.cfg.num_servers, node)
        for node, msg in self.joining:
            self.listener.send(node.peer, self._membership(node, msg))
        self.joining = []
        self.complete = True
        self._write_cluster()
        log.info("cluster complete: %s", ", ".join(sorted(self.nodes)))

    def _membership(self, node: NodeRecord, msg: Message, *, late: bool = False) -> Message:
        shard, primary = self.shards.role_of(node.id)
        return msg.reply(
            id=node.id,
            rank=node.rank,
            num_workers=self.cfg.num_workers,
            num_servers=self.cfg.num_servers,
            heartbeat_interval=self.cfg.heartbeat_interval,
            heartbeat_timeout=self.cfg.heartbeat_timeout,
            late=late,
            shard=shard,
            primary=primary,
            epoch=self.epoch,
            **self.shards.to_body(),
        )

    # --- servers that die and come back -----------------------------------------------------

    def _join_server(self, node: NodeRecord, msg: Message) -> Message:
        """A server registering after the start (a dead one restarted) becomes the backup of a
        shard that has none; it takes a dead server's rank."""
        for old in list(self.nodes.values()):  # its old process, if gone, is dead already
            mine = node.requested_rank in (-1, old.rank) and old.role == "server"
            if mine and old.live and old.host == socket.gethostname() and not _pid_alive(old.pid):
                self._server_died(old, "its process is gone and a new one took its rank")
        dead = [  # ranks of servers gone, or left for another serves their shard
            n
            for n in self.nodes.values()
            if n.role == "server"
            and not n.live
            and self.shards.role_of(n.id)[0] < 0
            and node.requested_rank in (-1, n.rank)
        ]
        shard = self.shards.without_backup()
        if not dead or shard is None:
            raise ClusterError("every shard has its server and its backup; no server can join")
        node.rank = dead[0].rank
        node.state = "alive"
        node.last_seen = time.monotonic()
        self.nodes[node.id] = node
        self.shards.place(shard, node)
        log.warning("%s joined as the backup of shard %d", node.id, shard)
        self._write_cluster()
        return self._membership(node, msg, late=True)

    def _server_died(self, node: NodeRecord, why: str, *, left: bool = False) -> None:
        """A server is gone (``left``: it said so) while the job runs: its backup serves its
        shard, or it drops out as a backup, or the shard is lost."""
        shard, primary = self.shards.role_of(node.id)
        node.state = "exited" if left else "dead"
        log.warning("%s %s", node.id, why if left else f"is dead: {why}")
        self._excuse(node.id)
        if shard < 0:  # (no role left: demoted, or dropped as a backup before)
            self._write_cluster()
            return
        if not primary:
            self.shards.drop_backup(shard)
            log.warning("shard %d has no backup now", shard)
        elif self.shards.promote(shard):
            log.warning(
                "shard %d: its backup %s serves it now", shard, _id(self.shards.primary[shard])
            )
        else:  # the launcher starts the cluster again from the last checkpoint
            self.shards.lost.append(shard)
            log.error("shard %d is lost: its server died and it has no synced backup", shard)
            self.exit_code = protocol.SHARD_LOST
            self._stop(f"shard {shard} is lost")
        self.shards.version += 1
        self._write_cluster()

    def _backup(self, peer: bytes, msg: Message) -> Message:
        """A shard's server reports its backup ``ready`` (it holds a whole copy) or ``lost``
        (it fell behind and was dropped); the reply says whether the sender still serves."""
        node = self._node(msg)
        shard = protocol.field(msg, "shard", int)
        state = protocol.field(msg, "state", str)
        address = protocol.field(msg, "address", str)
        if state not in ("ready", "lost"):
            raise ProtocolError(f"backup: state must be ready or lost, got {state!r}")
        if self.shards.role_of(node.id) != (shard, True):
            return msg.reply(serving=False)
        backup = self.shards.backup[shard]
        if backup is not None and backup.address == address:
            if state == "ready":
                self.shards.synced[shard] = True
                log.info("shard %d: %s holds a whole copy", shard, backup.id)
            else:
                log.warning("shard %d: %s fell behind; dropped", shard, backup.id)
                self.shards.drop_backup(shard)
            self._write_cluster()
        return msg.reply(serving=True)

    # --- workers that come and go -----------------------------------------------------------

    def _join(self, node: NodeRecord, msg: Message) -> Message | None:
        """A worker registering after the start takes the rank of a dead one (the one it asks
        for, if any); answered once such a rank is free."""
        workers = [n for n in self.nodes.values() if n.role == "worker"]
        wanted = [n for n in workers if node.requested_rank in (-1, n.rank)]
        for old in wanted:
            if old.live and old.host == socket.gethostname() and not _pid_alive(old.pid):
                self._worker_died(old, "its process is gone and a new one took its rank")
        # dead ranks nobody took over yet (a parked worker may just have)
        free = [
            n
            for n in wanted
            if (n.state == "dead" or (n.state == "exited" and n.rank in self.leases.retired))
            and self.nodes.get(n.id) is n
        ]
        if free:
            self._admit(node, msg, free[0].rank)
        elif node.requested_rank < 0 and not any(n.live for n in wanted):
            raise ClusterError("every worker of the cluster has finished; nothing to join")
        elif node.requested_rank < 0 and all(n.live for n in workers):
            raise ClusterError(
                f"the cluster has its {self.cfg.num_workers} workers; a worker can join only "
                "in place of a dead one"
            )
        else:
            self.parked.append((node, msg))
            log.info("a worker asks for rank %d, still alive: it waits", node.requested_rank)
        return None

    def _admit(self, node: NodeRecord, msg: Message, rank: int) -> None:
        self.leases.unretire(rank)  # (in place of a removed worker)
        if self.added_workers > self.joined_added:  # one the launcher was asked for
            self.joined_added += 1
        node.rank = rank
        node.state = "alive"
        node.last_seen = time.monotonic()
        # a finalize the dead one left is not this one's (kept until now: a worker only
        # thought dead that comes back is still answered)
        self.finalizing.pop(node.id, None)
        self.nodes[node.id] = node
        self.listener.send(node.peer, self._membership(node, msg, late=True))
        log.info("%s joined late (pid %d)", node.id, node.pid)
        self._rebalance()
        self._write_cluster()

    def _worker_died(self, node: NodeRecord, why: str) -> None:
        node.state = "dead"
        log.warning("%s is dead: %s", node.id, why)
        for share, taker in self.leases.orphan(node.rank, self._trainers()):
            log.warning("share %d of every batch: worker-%d -> worker-%d", share, node.rank, taker)
        self._excuse(node.id)
        self._finish_if_done()
        parked, self.parked = self.parked, []
        for late, msg in parked:  # one of them takes the rank
            if late.requested_rank in (-1, node.rank) and self.nodes.get(node.id) is node:
                self._admit(late, msg, node.rank)
            else:
                self.parked.append((late, msg))
        self._rebalance()

    def _rebalance(self) -> None:
        for share, joiner in self.leases.rebalance(self._trainers()):
            log.info("share %d will move to worker-%d at a clock boundary", share, joiner)

    def _trainers(self) -> list[int]:
        """The ranks of the live workers that may take a share: not those that finalized
        (they push nothing more)."""
        return [
            n.rank
            for n in self.nodes.values()
            if n.role == "worker" and n.live and n.id not in self.finalizing
        ]

    def _leases(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        stopping = self.stopping_since is not None
        if stopping:
            self.told_stop.add(node.id)
        return msg.reply(**self.leases.to_dict(), stop=stopping)

    def _release(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        share = protocol.field(msg, "share", int)
        clock = protocol.field(msg, "clock", int)
        try:
            taker = self.leases.release(share, node.rank, clock)
        except ValueError as exc:
            raise ClusterError(f"release: {exc}") from None
        log.info("share %d: worker-%d -> worker-%d from clock %d", share, node.rank, taker, clock)
        self._write_cluster()
        return msg.reply(**self.leases.to_dict())

    def _node(self, msg: Message) -> NodeRecord:
        node_id = protocol.field(msg, "node", str)
        try:
            return self.nodes[node_id]
        except KeyError:
            raise ClusterError(f"{msg.op}: unknown node {node_id!r}; register first") from None

    def _heartbeat(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        node.last_seen = time.monotonic()
        node.last_heartbeat = time.time()
        node.stats = protocol.scalars(protocol.field(msg, "stats", dict, {}))
        if node.state == "exited":  # (it said goodbye before a restart of the scheduler)
            return msg.reply(stop=True, leases=self.leases.version, epoch=self.epoch)
        if self.stopping_since is not None:
            self.told_stop.add(node.id)
        if node.state == "dead":
            node.state = "alive"
            log.warning("%s is back", node.id)
            self._rebalance()
            self._write_cluster()
        return msg.reply(
            stop=self.stopping_since is not None,
            leases=self.leases.version,
            epoch=self.epoch,
            steering=self.steering.newest.to_dict(),
            **self.shards.to_body(),
        )

    def _check_health(self) -> None:
        now = time.monotonic()
        if not self.complete and now - self.started > self.cfg.startup_timeout:
            for node, msg in self.joining:
                self.listener.send(
                    node.peer,
                    protocol.error(
                        msg,
                        "startup_timeout",
                        f"the cluster did not fill within {self.cfg.startup_timeout:g} s",
                    ),
                )
            self.joining = []
            log.error("cluster did not fill within %g s; giving up", self.cfg.startup_timeout)
            self.exit_code = 1
            self.stopping_since = now
            return
        changed = False
        for node in list(self.nodes.values()):
            if node.state == "alive" and now - node.last_seen > self.cfg.heartbeat_timeout:
                silent = f"missed heartbeats for {now - node.last_seen:.1f} s"
                if node.role == "worker":
                    self._worker_died(node, silent)
                else:
                    self._server_died(node, silent)
                changed = True
        if changed:
            self._write_cluster()

    # --- coordination -----------------------------------------------------------------------

    def _barrier(self, peer: bytes, msg: Message) -> Message | None:
        node = self._node(msg)
        name = protocol.field(msg, "name", str)
        group = protocol.field(msg, "group", str, "all")
        if name in self.released:  # a latecomer (it was thought dead): the answer it missed
            return msg.reply(values=self.released[name])
        if group not in protocol.GROUPS:
            raise ProtocolError(f"barrier: group must be one of {protocol.GROUPS}")
        if not self._in_group(node, group):
            raise ClusterError(f"{node.id} is not in barrier group {group!r}")
        if name not in self.barriers:
            members = {n.id for n in self.nodes.values() if n.live and self._in_group(n, group)}
            if group == "workers":  # a worker waiting for a share trains nothing yet
                members = {m for m in members if self.leases.held_by(self.nodes[m].rank)}
            self.barriers[name] = Barrier(group, members | {node.id})
        barrier = self.barriers[name]
        if barrier.group != group:
            raise ClusterError(f"barrier {name!r} is for {barrier.group}, not {group}")
        barrier.values[node.id] = _values(protocol.field(msg, "values", dict, {}))
        barrier.waiting[node.id] = msg
        barrier.peers[node.id] = peer
        barrier.members.add(node.id)
        self._release_barrier(name)
        return None

    def _excuse(self, node_id: str) -> None:
        """``node_id`` is live no more (dead, left, finalized): no barrier waits for it, and
        those complete without it are released."""
        for name in list(self.barriers):
            self.barriers[name].members.discard(node_id)
            self._release_barrier(name)

    def _release_barrier(self, name: str) -> None:
        """Answer a barrier whose members have all arrived (the dead excused)."""
        barrier = self.barriers[name]
        if not barrier.members <= set(barrier.waiting):
            return
        arrived = [self.nodes[m] for m in barrier.waiting if m in self.nodes]
        sums = barrier.sums(arrived)
        for node_id, req in barrier.waiting.items():
            self.listener.send(barrier.peers[node_id], req.reply(values=sums))
        del self.barriers[name]
        self.released[name] = sums
        self._write_cluster()  # a latecomer's answer survives a restart
        while len(self.released) > RELEASED_KEPT:
            del self.released[next(iter(self.released))]

    @staticmethod
    def _in_group(node: NodeRecord, group: str) -> bool:
        return group == "all" or group == node.role + "s"

    def _declare(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        raw = protocol.field(msg, "keyspace", dict)
        if raw.get("num_servers") != self.cfg.num_servers:  # before building anything
            raise ConfigError(
                f"key space is cut for {raw.get('num_servers')!r} servers; the cluster has "
                f"{self.cfg.num_servers}"
            )
        ks = KeySpace.from_dict(raw)
        if self.keyspace is None:
            self.keyspace, self.declared_by = ks, node.id
            log.info("%s declared %d tensors, %d chunks", node.id, len(ks.tensors), len(ks.chunks))
            self._write_cluster()
        elif ks.fingerprint() != self.keyspace.fingerprint():
            raise ConfigError(
                f"{node.id} declared a different model than {self.declared_by}: "
                f"{self.keyspace.describe_difference(ks)}"
            )
        return msg.reply(fingerprint=ks.fingerprint())

    def _keyspace(self, peer: bytes, msg: Message) -> Message:
        if self.keyspace is None:
            raise ClusterError("no worker has declared a model yet")
        return msg.reply(keyspace=self.keyspace.to_dict())

    def _ctl(self, peer: bytes, msg: Message) -> Message:
        """A change of the job's live settings (``pslm ctl``): the new version."""
        action = protocol.field(msg, "action", str)
        values = protocol.field(msg, "values", dict, {})
        if self.stopping_since is not None:
            raise ClusterError("the cluster is stopping")
        if action == "remove-worker":
            return msg.reply(**self._remove_worker(protocol.field(msg, "node", str)))
        if action == "add-worker":
            return msg.reply(**self._add_worker())
        doc = self.steering.newest.change(action, values)
        self.steering.add(doc)
        log.info("steering version %d: %s", doc.version, doc.what)
        for node in self.nodes.values():  # at once, not with the next heartbeat
            if node.role == "worker" and node.live and node.peer:
                self.listener.send(node.peer, Message("steering", body=doc.to_dict()))
        self._write_cluster()
        return msg.reply(steering=doc.to_dict())

    def _remove_worker(self, node_id: str) -> dict[str, Any]:
        """``pslm ctl remove-worker``: the worker hands its shares over at its next clock
        boundary (each to the worker with the fewest) and leaves; the job goes on."""
        node = self.nodes.get(node_id)
        if node is None or node.role != "worker" or not node.live:
            raise ClusterError(f"{node_id} is not a live worker")
        if node.rank in self.leases.retired:
            raise ClusterError(f"{node_id} is leaving already")
        if "shares_move" not in node.stats:
            raise ClusterError(f"{node_id} has not reported yet: try again in a second")
        if node.stats.get("shares_move") != 1.0:
            raise ClusterError(
                f"{node_id}'s shares cannot move to other workers (ssp, asp, local sgd and "
                "overlap keep each share on its worker): stop the job instead"
            )
        try:
            moves = self.leases.retire(node.rank, self._trainers())
        except ValueError as exc:
            raise ClusterError(f"cannot remove {node_id}: {exc}") from None
        for share, taker in moves:
            log.info("%s leaves: share %d will move to worker-%d", node_id, share, taker)
        self._write_cluster()
        return {"removed": node_id, "moves": {str(s): t for s, t in moves}}

    def _add_worker(self) -> dict[str, Any]:
        """``pslm ctl add-worker``: ask the launcher for a new worker process, which takes the
        rank of a removed or dead worker and a share from a worker holding two or more."""
        free = [
            n.rank
            for n in self.nodes.values()
            if n.role == "worker" and (n.state == "dead" or n.rank in self.leases.retired)
        ]
        if len(free) <= self.added_workers - self.joined_added:
            raise ClusterError(
                f"the job has its {self.cfg.num_workers} workers (one per share of the batch): "
                "a worker can be added in place of a removed or dead one"
            )
        self.added_workers += 1
        log.info("asked the launcher for a worker (%d so far)", self.added_workers)
        self._write_cluster()
        return {"add_workers": self.added_workers}

    def _steering(self, peer: bytes, msg: Message) -> Message:
        """A version of the live settings ({version}; default the newest)."""
        version = protocol.field(msg, "version", int, self.steering.newest.version)
        doc = self.steering.get(version)
        if doc is None:
            raise ClusterError(f"steering version {version} is not kept any more")
        return msg.reply(steering=doc.to_dict())

    def _status(self, peer: bytes, msg: Message) -> Message:
        return msg.reply(
            nodes=[n.to_json() for n in self.nodes.values()],
            num_workers=self.cfg.num_workers,
            num_servers=self.cfg.num_servers,
            keyspace=self.keyspace.fingerprint() if self.keyspace else None,
            run_dir=str(Path(self.cfg.run_dir).resolve()) if self.cfg.run_dir else "",
            steering=self.steering.newest.to_dict(),
            **self.shards.to_body(),
        )

    # --- shutdown ---------------------------------------------------------------------------

    def _finalize(self, peer: bytes, msg: Message) -> Message | None:
        node = self._node(msg)
        if node.role != "worker":
            raise ClusterError("only workers finalize")
        removed = node.rank in self.leases.retired and not self.leases.held_by(node.rank)
        if removed or self.stopping_since is not None:  # it leaves; nothing to wait for
            node.state = "exited"
            why = "removed" if removed else "the cluster stops"
            log.info("%s left the job (%s)", node.id, why)
            self._excuse(node.id)
            self._write_cluster()
            return msg.reply()
        self.finalizing[node.id] = (peer, msg)
        self._finish_if_done()
        return None

    def _finish_if_done(self) -> None:
        """Stop the cluster once every live worker that holds shares has finalized (the stop
        answers them)."""
        if not self.finalizing or self.stopping_since is not None:
            return
        holders = {
            n.id
            for n in self.nodes.values()
            if n.role == "worker" and n.live and self.leases.held_by(n.rank)
        }
        if holders <= set(self.finalizing):
            self._stop("every worker finalized")

    def _leave(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        if node.peer and peer != node.peer:  # (b"": a recovered scheduler knows no peers)
            log.warning(
                "%s: a leave from another process than the one registered: ignored", node.id
            )
            return msg.reply()  # (one that a new process replaced since; it has no say)
        if node.role == "server" and node.live and self.complete and self.stopping_since is None:
            # not told to stop (Ctrl-C, an unhandled error): its shard is served on as after
            # a death, not left waiting for a server that is gone
            self._server_died(node, "left while the job runs", left=True)
            return msg.reply()
        node.state = "exited"
        log.info("%s left", node.id)
        self._excuse(node.id)
        self._write_cluster()
        return msg.reply()

    def _shutdown(self, peer: bytes, msg: Message) -> Message:
        self._stop("shutdown requested")
        return msg.reply()

    def _stop(self, why: str) -> None:
        if self.stopping_since is not None:
            return
        log.info("shutting down: %s", why)
        self.stopping_since = time.monotonic()
        finalizing, self.finalizing = self.finalizing, {}
        for node_id, (peer, req) in finalizing.items():  # whatever stopped it: answered
            self.nodes[node_id].state = "exited"
            self._excuse(node_id)
            self.listener.send(peer, req.reply())
        for node in self.nodes.values():  # (a recovered scheduler tells them by heartbeat)
            if node.role == "server" and node.state != "exited" and node.peer:
                self.listener.send(node.peer, Message("shutdown"))
        self._write_cluster()

    def _done(self) -> bool:
        if self.stopping_since is None:
            return False
        servers = [n for n in self.nodes.values() if n.role == "server"]
        waiting = [  # live workers without shares, until they heard of the stop
            n
            for n in self.nodes.values()
            if n.role == "worker" and n.live and n.id not in self.told_stop
        ]
        if all(n.state in ("exited", "dead") for n in servers) and not waiting:
            return True
        if time.monotonic() - self.stopping_since > self.cfg.shutdown_timeout:
            log.warning("servers did not leave within %g s", self.cfg.shutdown_timeout)
            return True
        return False

    def _write_cluster(self) -> None:
        if not self.cfg.run_dir:
            return
        doc = {
            "scheduler": {
                "address": self.address,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            },
            "num_workers": self.cfg.num_workers,
            "num_servers": self.cfg.num_servers,
            "state": "stopping" if self.stopping_since is not None else "running",
            "nodes": sorted((n.to_json() for n in self.nodes.values()), key=lambda d: d["id"]),
            "leases": self.leases.to_dict(),
            "shards": self.shards.to_json(),
            "lost_shards": self.shards.lost,
            "steering": self.steering.newest.to_dict(),
            "add_workers": self.added_workers,
        }
        try:
            _write_atomic(Path(self.cfg.run_dir) / "cluster.json", json.dumps(doc, indent=2) + "\n")
            if self.complete:
                _write_atomic(Path(self.cfg.run_dir) / STATE_FILE, json.dumps(self._state()))
        except OSError as exc:  # the file informs; failing to write it must not stop the cluster
            log.warning("cannot write cluster.json: %s", exc)

    # --- a scheduler that dies and comes back -----------------------------------------------

    def _state(self) -> dict[str, Any]:
        """What a restarted scheduler needs and cannot learn from the nodes."""
        return {
            "nodes": [
                {**n.to_json(), "requested_rank": n.requested_rank} for n in self.nodes.values()
            ],
            "leases": self.leases.to_dict(),
            "shards": self.shards.to_state(),
            "keyspace": self.keyspace.to_dict() if self.keyspace is not None else None,
            "declared_by": self.declared_by,
            "released": self.released,
            "stopping": self.stopping_since is not None,
            "steering": self.steering.to_dict(),
        }

    def _recover(self) -> None:
        path = Path(str(self.cfg.run_dir)) / STATE_FILE
        try:
            doc = json.loads(path.read_text())
            now = time.monotonic()
            for raw in doc["nodes"]:
                node = NodeRecord(
                    role=str(raw["role"]),
                    requested_rank=int(raw["requested_rank"]),
                    address=str(raw["address"]),
                    pid=int(raw["pid"]),
                    host=str(raw["host"]),
                    peer=b"",  # known again once it sends something
                    rank=int(raw["rank"]),
                    state=str(raw["state"]),
                    last_seen=now,
                )
                self.nodes[node.id] = node
            self.leases = ShareLeases.from_dict(doc["leases"])
            self.shards = ShardTable.from_state(doc["shards"], self.nodes)
            if doc["keyspace"] is not None:
                self.keyspace = KeySpace.from_dict(doc["keyspace"])
                self.declared_by = str(doc["declared_by"])
            self.released = {str(k): dict(v) for k, v in doc["released"].items()}
            if doc.get("stopping"):
                self.stopping_since = time.monotonic()
            self.steering = SteeringLog.start(doc.get("steering"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.listener.close()
            raise ConfigError(f"cannot recover the cluster from {path}: {exc!r}") from None
        self.complete = True
        log.warning(
            "recovered the cluster from %s: %s",
            path,
            ", ".join(f"{n.id} {n.state}" for n in self.nodes.values()),
        )


def _id(node: NodeRecord | None) -> str:
    return node.id if node is not None else "nobody"


def _values(raw: dict[str, Any]) -> dict[str, float]:
    if len(raw) > MAX_VALUES:
        raise ProtocolError(f"barrier: at most {MAX_VALUES} values")
    out = {}
    for name, value in raw.items():
        if (
            not isinstance(name, str)
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            raise ProtocolError("barrier: values map names to numbers")
        out[name] = float(value)
    return out


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (and is no zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
