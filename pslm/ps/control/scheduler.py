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

Each turn of the loop takes every request waiting (up to ``MAX_BATCH``), checks the nodes'
health, writes the files once if anything changed, and only then sends what the turn answered:
a reply never tells of a change that a restarted scheduler would not know, and a flood of
requests costs one write per turn, not one per request, so heartbeats queued behind it are
counted before anyone is found silent.

The loop, registration (``joining``), heartbeats, barriers (``barriers``) and what is kept on
disk (``persist``) are here; nodes that die and come back are ``churn``, live control and the
end of a job ``operations``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from pslm.errors import ClusterError, ConfigError, ProtocolError, RefusedError, TransportError
from pslm.files import write_atomic
from pslm.ps.control.barriers import Barriers
from pslm.ps.control.base import SchedulerConfig
from pslm.ps.control.churn import Churn
from pslm.ps.control.joining import Filling
from pslm.ps.control.leases import ShareLeases
from pslm.ps.control.node import node_role
from pslm.ps.control.operations import Operations
from pslm.ps.control.persist import STATE_FILE, Kept, write_files
from pslm.ps.control.records import MAX_PID, NodeRecord
from pslm.ps.control.table import ShardTable
from pslm.ps.core import operator, protocol
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.steering import SteeringLog
from pslm.wire.message import Message
from pslm.wire.peerlog import PeerLog
from pslm.wire.transport import Listener, Poller, readable, tcp_address

log = logging.getLogger("pslm.scheduler")

MAX_BATCH = 256
"""Most requests one turn of the loop takes before it writes its files and sends the replies:
a flood holds no reply back for long."""


class Scheduler(Churn, Operations):
    """The scheduler's state and request loop. Single-threaded."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.listener = Listener(cfg.bind, max_bytes=0)  # control messages carry no tensors
        self.bad = PeerLog(log)  # bad messages, once per peer per minute
        self.address = self.listener.address
        self.nodes: dict[str, NodeRecord] = {}  # by node id once ranked
        self.filling = Filling({"server": self._size("server"), "worker": cfg.num_workers})
        self.barriers = Barriers()
        self.finalizing: dict[str, tuple[bytes, Message]] = {}
        self.leases = ShareLeases(cfg.num_workers)
        self.shards: ShardTable[NodeRecord] = ShardTable(cfg.num_servers)
        self.parked: list[tuple[NodeRecord, Message]] = []  # late workers awaiting a rank
        self.told_stop: set[str] = set()  # nodes that heard the cluster is stopping
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
        self.outbox: list[tuple[bytes, Message]] = []
        self.dirty = False
        """The state changed this turn: the files are written before the outbox is sent."""
        self.writes = 0
        self.write_failed = False
        """Times the files were written (``status``: the cost of persisting, in writes)."""
        self.operator = operator.ensure(cfg.run_dir) if cfg.run_dir else ""
        """The credential ``ctl`` and ``shutdown`` need (``RUN/operator``; none without a run
        directory: then the roles alone are checked)."""
        if cfg.recover:
            self._recover()
        elif cfg.run_dir:  # another cluster's, in this run directory before
            (Path(cfg.run_dir) / STATE_FILE).unlink(missing_ok=True)
        if cfg.address_file:
            try:
                write_atomic(Path(cfg.address_file), self.address)
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
                if poller.poll(min(0.2, self.cfg.heartbeat_interval)):
                    self._serve_waiting(handlers)
                self._check_health()
                self._flush()
        finally:
            self.dirty = True  # the last state is always written ("stopping", the exits)
            self._flush()
            self.listener.close()
        return self.exit_code

    def _serve_waiting(self, handlers: dict[str, Any]) -> None:
        """Every request waiting, up to MAX_BATCH (the first: at least one)."""
        for _ in range(MAX_BATCH):
            self._serve_one(handlers)
            if not readable(self.listener.socket):
                return

    def _changed(self) -> None:
        self.dirty = True

    def _flush(self) -> None:
        """The end of a turn: the files, if the state changed, then everything to send."""
        if self.dirty:
            self.dirty = False
            try:
                self._write_cluster()
                self.write_failed = False
            except OSError as exc:  # (a full disk must not take the cluster down: next turn)
                self.dirty = True
                if not self.write_failed:  # (once until a write succeeds, not every turn)
                    log.error("cannot write the scheduler's files (retrying): %s", exc)
                self.write_failed = True
        outbox, self.outbox = self.outbox, []
        for peer, msg in outbox:
            try:
                self.listener.send(peer, msg)
            except TransportError as exc:  # (one peer's failure must not stop the others')
                log.warning("cannot send %r: %s", msg.op, exc)

    def _serve_one(self, handlers: dict[str, Any]) -> None:
        try:
            peer, msg = self.listener.recv()
        except ProtocolError as exc:
            self.bad.warning(exc.sender, "bad message: %s", exc)
            if exc.sender is not None and exc.request_id is not None:
                self._send(exc.sender, protocol.error(exc.request_id, "protocol", str(exc)))
            return
        handler = handlers.get(msg.op)
        if handler is None:
            self._send(peer, protocol.error(msg, "unknown_op", f"unknown op {msg.op!r}"))
            return
        try:
            protocol.check_sender(msg)  # (a worker's bug cannot stop the job)
            _same_role(msg)
            if msg.op in ("ctl", "shutdown") and self.operator:
                operator.check(msg.body.get(operator.FIELD), self.operator)
            reply = handler(peer, msg)
        except (ProtocolError, ConfigError, ClusterError) as exc:
            reply = protocol.error(msg, getattr(exc, "code", "refused"), str(exc))
        except Exception as exc:  # a bug or a full disk must not take the cluster down
            log.exception("internal error on %r", msg.op)
            reply = protocol.error(msg, "internal", f"internal scheduler error: {exc!r}")
        if reply is not None:
            self._send(peer, reply)

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

        self._send_all(self.filling.add(node, msg))
        if self.filling.full:
            self._start_cluster()
        return None  # answered when the cluster is complete

    def _size(self, role: str) -> int:
        """Processes of ``role``: a server per shard, and as many backups with replicas."""
        if role == "server":
            return self.cfg.num_servers * (1 + self.cfg.replicas)
        return self.cfg.num_workers

    def _start_cluster(self) -> None:
        joined = self.filling.ranked()
        for node, _ in sorted(joined, key=lambda j: (j[0].role, j[0].rank)):
            node.state = "alive"
            node.last_seen = time.monotonic()
            self.nodes[node.id] = node
            if node.role == "server":  # ranks past the shards are backups, one per shard
                self.shards.place(node.rank % self.cfg.num_servers, node)
        self.complete = True
        # cluster.json describes the cluster before any node hears that it is complete
        self._changed()
        for node, msg in joined:
            self._send(node.peer, self._membership(node, msg))
        log.info("cluster complete: %s", ", ".join(sorted(self.nodes)))

    def _send_all(self, answers: list[tuple[bytes, Message]]) -> None:
        for peer, reply in answers:
            self._send(peer, reply)

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
            self._changed()
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
            why = f"the cluster did not fill within {self.cfg.startup_timeout:g} s"
            self._send_all(self.filling.give_up(why))
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
            self._changed()

    # --- coordination -----------------------------------------------------------------------

    def _barrier(self, peer: bytes, msg: Message) -> Message | None:
        node = self._node(msg)
        name = protocol.field(msg, "name", str)
        group = protocol.field(msg, "group", str, "all")
        if name in self.barriers.released:  # a latecomer (it was thought dead): what it missed
            return msg.reply(values=self.barriers.released[name])
        if group not in protocol.GROUPS:
            raise ProtocolError(f"barrier: group must be one of {protocol.GROUPS}")
        if not self._in_group(node, group):
            raise ClusterError(f"{node.id} is not in barrier group {group!r}")

        def members() -> set[str]:
            live = {n.id for n in self.nodes.values() if n.live and self._in_group(n, group)}
            if group == "workers":  # a worker waiting for a share trains nothing yet
                live = {m for m in live if self.leases.held_by(self.nodes[m].rank)}
            return live

        given = protocol.field(msg, "values", dict, {})
        answers = self.barriers.arrive(name, group, node, peer, msg, given, members, self.nodes)
        self._answer_barriers(answers)
        return None

    def _excuse(self, node_id: str) -> None:
        """``node_id`` is live no more (dead, left, finalized): no barrier waits for it, and
        those complete without it are released."""
        self._answer_barriers(self.barriers.excuse(node_id, self.nodes))

    def _answer_barriers(self, answers: list[tuple[bytes, Message]]) -> None:
        self._send_all(answers)
        if answers:
            self._changed()  # a latecomer's answer survives a restart

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
            self._changed()
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

    def _status(self, peer: bytes, msg: Message) -> Message:
        return msg.reply(
            nodes=[n.to_json() for n in self.nodes.values()],
            num_workers=self.cfg.num_workers,
            num_servers=self.cfg.num_servers,
            keyspace=self.keyspace.fingerprint() if self.keyspace else None,
            run_dir=str(Path(self.cfg.run_dir).resolve()) if self.cfg.run_dir else "",
            steering=self.steering.newest.to_dict(),
            writes=self.writes,
            **self.shards.to_body(),
        )

    def _write_cluster(self) -> None:
        """Write cluster.json and the state now (``_changed``: at the end of this turn)."""
        if not self.cfg.run_dir:
            return
        self.writes += 1
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
        write_files(self.cfg.run_dir, doc, self._kept() if self.complete else None)

    # --- a scheduler that dies and comes back -----------------------------------------------

    def _kept(self) -> Kept:
        return Kept(
            nodes=self.nodes,
            leases=self.leases,
            shards=self.shards,
            keyspace=self.keyspace,
            declared_by=self.declared_by,
            released=self.barriers.released,
            stopping=self.stopping_since is not None,
            steering=self.steering,
        )

    def _recover(self) -> None:
        path = Path(str(self.cfg.run_dir)) / STATE_FILE
        try:
            kept = Kept.load(path)
        except ConfigError:
            self.listener.close()
            raise
        self.nodes, self.leases, self.shards = kept.nodes, kept.leases, kept.shards
        self.keyspace, self.declared_by = kept.keyspace, kept.declared_by
        self.barriers = Barriers(kept.released)
        if kept.stopping:
            self.stopping_since = time.monotonic()
        self.steering = kept.steering
        self.complete = True
        log.warning(
            "recovered the cluster from %s: %s",
            path,
            ", ".join(f"{n.id} {n.state}" for n in self.nodes.values()),
        )


def _same_role(msg: Message) -> None:
    """RefusedError (forbidden) unless a member registers, beats or leaves as the role its
    connection proved (a worker cannot keep a dead server alive with its heartbeats)."""
    if msg.sender not in protocol.ROLES:
        return
    claimed = msg.body.get("role") if msg.op == "register" else None
    node = msg.body.get("node") if msg.op in ("heartbeat", "leave") else None
    if isinstance(node, str):
        claimed = node_role(node) or claimed
    if isinstance(claimed, str) and claimed and claimed != msg.sender:
        raise RefusedError(
            f"{msg.op} as a {claimed} from a {msg.sender}'s connection: a connection speaks "
            f"only for the role it proved",
            code="forbidden",
        )
