"""A server process: holds one shard, applies updates under BSP, answers pushes and pulls.

    cfg = ServerConfig(scheduler="tcp://127.0.0.1:9000")
    Server(cfg).run()        # blocks until the scheduler shuts the cluster down; exit code

BSP (DESIGN.md): the update for clock c is applied once every share's push for clock c has
arrived: the weighted mean of the gradients (summed in share order, so runs repeat exactly),
global-norm clipping, one optimizer step; the version becomes c + 1. A pull asking for
``min_version`` is answered once the version reaches it. A share is a part of every global
batch: share r is worker r's, until the scheduler leases it to another worker (its worker
died); the server does not care who pushes a share, only that each is taken once a clock (a
push in parts is one worker's: a part from another worker starts the share's push anew).

SSP and ASP (``consistency``): each push is applied on arrival as one optimizer step with that
worker's gradient (clipped by the norm the worker computed for it, at the learning rate of its
clock); a read by a worker at clock c waits in the staleness gate until every worker has pushed
at least c - s times (never, under ASP). Every reply says the staleness the read saw.

local:H: the workers run their own optimizer and push every H steps the change of their
parameters; rounds are gated as under BSP and the mean change is added to the parameters.

Clipping is exact across shards: each server sends its part of the squared norm of the mean
gradient to every other server (``norm`` notices) and all of them add the parts in server-rank
order, so every server computes the same global norm and the same factor that
``torch.nn.utils.clip_grad_norm_`` would on the whole model.

Replication (``replicas`` 1 at the scheduler): each shard has a backup, a server process of
its own that keeps a copy of the shard. The primary sends it the whole shard when it appears
(``sync``) and then every update before applying it (``update``: the reduced gradient, its
multiplier, where it goes), and answers no push until the backup has confirmed: an update a
worker has seen is on two servers. The backup applies the same kernels to the same inputs, so
its copy is bit for bit the primary's. When the primary dies the scheduler promotes the backup
(the shard table, which every node follows through its heartbeats); the workers send it every
request that had no answer, and duplicates are recognised as such (exactly once). A backup
that cannot keep up is dropped; a new one is rebuilt by ``sync``.

Pull replies go out without copying: they are views of the live parameter buffer. Each one is
tracked, and an update waits until ZeroMQ has finished reading the previous replies, so a reader
never sees a half-updated chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pslm.errors import (
    ClusterError,
    ConfigError,
    ProtocolError,
    PSLMError,
    RefusedError,
    ShardFailed,
)
from pslm.ps.control.node import Heartbeat, Membership, Table, register
from pslm.ps.core import protocol
from pslm.ps.core.consistency import Consistency, StalenessGate
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.core.push import PushHeader
from pslm.ps.core.steering import IN_FORCE, SETTINGS, optimizer_settings
from pslm.ps.server.intake import Part, PendingPush, Reply, Selection, decode_part
from pslm.ps.server.replica import (
    BackupLink,
    Snapshot,
    Update,
    read_sync,
    read_update,
    sync_message,
    update_message,
)
from pslm.ps.server.shard import Grad, ShardStore, clip_coef
from pslm.ps.server.shm import SharedPaths
from pslm.wire.codecs import Codec, get_codec
from pslm.wire.message import DEFAULT_MAX_MESSAGE, Message
from pslm.wire.transport import (
    Channel,
    Connection,
    Listener,
    Poller,
    Sent,
    readable,
    tcp_address,
)

log = logging.getLogger("pslm.server")


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    """Settings of a server process."""

    scheduler: str
    """Address of the scheduler (host:port or tcp://host:port)."""
    bind: str = "tcp://127.0.0.1:*"
    """Address to listen on for workers and peer servers (``*``: any free port)."""
    advertise: str = ""
    """Address others should use to reach this server (host or host:port); default: the bound
    address."""
    rank: int = -1
    """Requested server rank; -1 lets the scheduler choose."""
    timeout: float = 30.0
    """Seconds before a request to the scheduler times out."""
    register_timeout: float = 120.0
    """Seconds to wait for the whole cluster to register."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE
    """Largest message accepted, in bytes of tensor data."""

    def __post_init__(self) -> None:
        try:
            self.scheduler = tcp_address(self.scheduler)
            self.bind = tcp_address(self.bind)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.timeout <= 0 or self.register_timeout <= 0:
            raise ConfigError("timeouts must be positive")


@dataclass(slots=True)
class _Read:
    """A read waiting for the staleness gate (SSP)."""

    peer: bytes
    msg: Message
    clock: int
    """The reader's clock: it reads once every worker is within the bound of it."""
    selection: Selection
    scalars: dict[str, float] | None = None


@dataclass(slots=True)
class Clock:
    """What the server gathers for the clock it is about to apply."""

    pushes: dict[int, tuple[float, list[Grad]]] = field(default_factory=dict)
    grads: list[Grad] | None = None
    factor: float = 1.0
    """grads * factor is the mean gradient."""
    norms: dict[int, float] = field(default_factory=dict)
    scalars: dict[int, dict[str, float]] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    pushed_by: dict[int, int] = field(default_factory=dict)
    """Share -> the worker whose push of it was taken."""


READER_GRACE = 1.0
"""Seconds an update waits for ZeroMQ to finish sending earlier replies before it copies."""


class Server:
    """One server's state and request loop. Single-threaded (heartbeats have their own)."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.listener = Listener(cfg.bind, max_bytes=cfg.max_message_bytes)
        self.address = _advertised(self.listener.address, cfg.advertise)
        self.scheduler = Channel(timeout=cfg.timeout)
        self.scheduler.connect("scheduler", cfg.scheduler)
        self.me: Membership | None = None
        self.peers: dict[int, Connection] = {}
        self.store: ShardStore | None = None
        self.clock = Clock()
        self.future_norms: dict[int, float] = {}  # norms for version + 1, from faster peers
        self.incoming: dict[int, PendingPush] = {}  # pushes whose parts are still arriving
        self.after_update: list[Reply] = []  # push parts waiting for the update
        self.parked: list[tuple[bytes, Message, int, Selection]] = []
        self.trackers: list[Sent] = []
        self.stopping = False
        self.consistency = Consistency()
        self.gate = StalenessGate(0, 0)
        self.reads: list[_Read] = []
        self.last_scalars: dict[str, float] = {}
        """The last clock's mean scalars (for a replayed push that asks for them)."""
        self.staleness_seen: dict[int, int] = {}
        """How many reads saw each staleness (logged at exit)."""
        self.shard = -1
        """The shard this server serves (primary) or backs up."""
        self.primary = True
        self.backup: BackupLink | None = None
        """To this shard's backup (a primary with replication)."""
        self.backup_address = ""
        self.table: Table | None = None
        self.sent_norms: dict[int, float] = {}
        """Clock -> this shard's part of the squared norm, for the last clocks (sent again to a
        server that takes over a shard)."""
        self.last_by: list[int] = []
        """Who pushed each share of the last clock (for a replayed push's reply)."""
        self.demoted = False
        self.beat: Heartbeat | None = None
        self.retry_backup_at = 0.0
        self.steered = 0.0
        """The version of the live settings in force (``pslm.ps.core.steering``)."""
        self.fence: tuple[int, Consistency] | None = None
        """A change of the consistency model: at this clock, to this model (``_fence``)."""
        self.read_up_to = 0
        """SSP/ASP: the highest clock a read was answered at."""
        self.counts = {"bytes_in": 0, "bytes_out": 0, "messages": 0}
        """Tensor bytes received and sent, messages taken (reported with heartbeats)."""
        self.shared = SharedPaths()
        """Workers on this machine that push through shared memory (``pslm.ps.client.shm``)."""

    @property
    def local(self) -> bool:
        """Local SGD: pushes carry parameter changes, averaged in, no server optimizer."""
        return self.consistency.kind == "local"

    @property
    def rank(self) -> int:
        assert self.me is not None
        return self.me.rank

    def run(self) -> int:
        """Register, serve until told to stop, leave. Returns the process exit code."""
        beat: Heartbeat | None = None
        try:
            self.me = register(
                self.scheduler,
                role="server",
                rank=self.cfg.rank,
                address=self.address,
                timeout=self.cfg.register_timeout,
            )
            self.shard, self.primary = self.me.shard, self.me.primary
            log.info(
                "%s listening on %s: %s of shard %d",
                self.me.node_id,
                self.address,
                "server" if self.primary else "backup",
                self.shard,
            )
            for r, addr in enumerate(self.me.servers):
                if r != self.shard:
                    self.peers[r] = Connection(addr, send_timeout=self.cfg.timeout)
            self.table = Table(-1, self.me.servers, self.me.backups)
            beat = Heartbeat(
                self.cfg.scheduler,
                self.me.node_id,
                self.me.heartbeat_interval,
                lost_after=2 * self.me.heartbeat_timeout,
                stats=self._stats,
            )
            beat.start()
            self.beat = beat
            return self._loop(beat)
        finally:
            if beat is not None:
                beat.close()
            if self.staleness_seen:
                log.info(
                    "staleness of reads (staleness: count): %s",
                    dict(sorted(self.staleness_seen.items())),
                )
            self._leave()
            for conn in self.peers.values():
                conn.close()
            if self.backup is not None:
                self.backup.close()
            self.scheduler.close()
            self.listener.close()

    def _loop(self, beat: Heartbeat) -> int:
        poller = Poller(self.listener)
        sched_socket = self.scheduler.socket("scheduler")
        while True:
            for _ in poller.poll(0.2):
                self._serve_one()
            if readable(sched_socket):
                for notice in self.scheduler.drain("scheduler"):
                    if notice.op == "shutdown":
                        self.stopping = True
            if beat.table is not None and not self.stopping:
                self._follow(beat.table)
            if self.demoted:
                return protocol.DEMOTED
            if self.stopping or beat.stop_requested.is_set():
                log.info("%s shutting down", self.me.node_id if self.me else "server")
                return 0
            if beat.lost.is_set():
                log.error("lost the scheduler at %s; exiting", self.cfg.scheduler)
                return 1

    def _serve_one(self) -> None:
        try:
            peer, msg = self.listener.recv()
        except ProtocolError as exc:
            log.warning("bad message: %s", exc)
            if exc.sender is not None and exc.request_id:
                self.listener.send(exc.sender, protocol.error(exc.request_id, "protocol", str(exc)))
            return
        self.counts["bytes_in"] += sum(t.nbytes for t in msg.tensors)
        self.counts["messages"] += 1
        try:
            self._dispatch(peer, msg)
        except ShardFailed:
            raise  # (the server leaves: answering on would serve a shard half-stepped)
        except (ProtocolError, ConfigError, ClusterError) as exc:
            self._refuse(peer, msg, getattr(exc, "code", "refused"), str(exc))
        except Exception as exc:  # a bug must not take the shard down with it
            log.exception("internal error on %r", msg.op)
            self._refuse(peer, msg, "internal", f"internal server error: {exc!r}")

    def _refuse(self, peer: bytes, msg: Message, code: str, text: str) -> None:
        if msg.id:
            self.listener.send(peer, protocol.error(msg, code, text))
        else:
            log.warning("dropped %r notice: %s", msg.op, text)

    def _dispatch(self, peer: bytes, msg: Message) -> None:
        if msg.op in ("init", "push", "pull", "save", "fence") and not self.primary:
            # workers come here only once the scheduler promoted this backup
            log.warning("a worker reached this backup: serving shard %d now", self.shard)
            self._promoted()
        if msg.op == "init":
            self.listener.send(peer, self._init(msg))
        elif msg.op == "push":
            self._push(peer, msg)
        elif msg.op == "pull":
            self._pull(peer, msg)
        elif msg.op == "norm":
            self._norm(msg)
        elif msg.op == "save":
            self.listener.send(peer, self._save(msg))
        elif msg.op == "sync":
            self.listener.send(peer, self._take_sync(msg))
        elif msg.op == "update":
            self._take_update(peer, msg)
        elif msg.op == "read":
            self._read(peer, msg)
        elif msg.op == "fence":
            self.listener.send(peer, self._fence(msg))
        elif msg.op == "attach":
            if not self.primary:
                raise RefusedError("attach: this server is a backup", code="no_shm")
            self.listener.send(peer, self.shared.attach(msg, self._worker(msg), self._store()))
        else:
            raise ProtocolError(f"unknown op {msg.op!r}")

    # --- handlers ---------------------------------------------------------------------------

    def _init(self, msg: Message) -> Message:
        assert self.me is not None
        self._worker(msg)
        raw = protocol.field(msg, "keyspace", dict)
        if raw.get("num_servers") != self.me.num_servers:  # before building anything
            raise ConfigError(
                f"key space is cut for {raw.get('num_servers')!r} servers, the cluster has "
                f"{self.me.num_servers}"
            )
        ks = KeySpace.from_dict(raw)
        opt = OptimizerConfig.from_dict(protocol.field(msg, "optimizer", dict))
        mode = Consistency.from_dict(protocol.field(msg, "consistency", dict, {}))
        if self.store is not None:
            same = (
                ks.fingerprint() == self.store.keyspace.fingerprint()
                and opt == self.store.optimizer
                and mode == self.consistency
            )
            if not same:
                raise RefusedError(
                    "already initialised with another model, optimizer or consistency model"
                )
            return msg.reply(version=self.store.version)
        store = ShardStore(ks, self.shard, opt)
        restore = protocol.field(msg, "restore", str, "")
        clock = protocol.field(msg, "clock", int, 0)
        if clock < 0:
            raise ProtocolError(f"init: clock must be >= 0, got {clock}")
        if restore:  # a checkpoint's shard, not the values in the message
            if msg.tensors:
                raise ProtocolError("init: restore takes no tensors")
            path = Path(restore) / shard_file(self.shard, self.me.num_servers)
            store.restore(path)
            log.info("restored version %d from %s", store.version, path)
        else:
            store.load(msg.tensors)
        self.store = store
        self.consistency = mode
        self.gate = StalenessGate(self.me.num_workers, mode.bound)
        self.gate.clocks = [clock] * self.me.num_workers  # every worker resumes at ``clock``
        log.info(
            "initialised: %d chunks, %d parameters, %s, %s, version %d",
            len(store.chunks),
            store.numel,
            opt.name,
            mode,
            store.version,
        )
        if self.backup is not None:
            self._sync()
        return msg.reply(version=store.version)

    def _push(self, peer: bytes, msg: Message) -> None:
        """A push, or one part of it (``pslm.ps.server.intake``); applied once complete."""
        store = self._store()
        assert self.me is not None
        head = PushHeader.decode(msg, self.me.num_workers)
        share, worker, clock = head.share, head.worker, head.clock
        tensors = self.shared.push(head, msg.tensors, store)
        part = decode_part(head, tensors, store)
        if self._replayed(peer, msg, head, part):
            return
        self._check_clock(share, clock)
        pending = self.incoming.get(share)
        if pending is not None and pending.worker != worker:
            self._discard(share, pending, worker)
            pending = None
        pending = pending or PendingPush.start(clock, head.weight, store, worker)
        pending.check(part)
        steered = IN_FORCE in head.scalars  # its own settings say whether it is clipped
        if part.final and self.consistency.asynchronous and store.optimizer.clip_norm > 0:
            if pending.sq_norm is None and part.sq_norm is None and not steered:
                raise ProtocolError("push: sq_norm is needed with clipping under SSP/ASP")
        pending.add(part, head.scalars)
        pending.seqs.add(head.seq)
        if head.reply_params:
            pending.replies.append(Reply(part.priority, peer, msg, part.reply))
        elif self.consistency.asynchronous:  # once applied, on the backup too (_push_now)
            pending.acks.append((peer, msg))
        else:  # BSP: the worker keeps a copy to send again until its clock is applied
            self.listener.send(peer, msg.reply(version=store.version))
        self.incoming[share] = pending
        if part.final:
            del self.incoming[share]
            self._complete(share, pending)

    def _discard(self, share: int, pending: PendingPush, worker: int) -> None:
        """``worker`` pushes ``share``, which another worker had begun to push in parts: that
        one died and the share is ``worker``'s now, pushed anew. The dead one's parts go; what
        waits for them is refused."""
        log.warning(
            "share %d's push for clock %d: worker %d's %d parts dropped, worker %d pushes it now",
            share,
            pending.clock,
            pending.worker,
            len(pending.seqs),
            worker,
        )
        why = f"share {share}'s push for clock {pending.clock} is worker {worker}'s now"
        for r in pending.replies:
            self.listener.send(r.peer, protocol.error(r.msg, "superseded", why))
        for peer, msg in pending.acks:
            self.listener.send(peer, protocol.error(msg, "superseded", why))
        del self.incoming[share]

    def _replayed(self, peer: bytes, msg: Message, head: PushHeader, part: Part) -> bool:
        """Answer a message of a push this server has already taken - a client retrying after
        a timeout, a replay, or the new holder of a dead worker's share pushing what that
        worker had pushed whole - without taking it again (exactly once). False if new (a
        part is the same only from the same worker: the new holder's parts are its own)."""
        store = self._store()
        share, worker, clock, with_params = head.share, head.worker, head.clock, head.reply_params
        due = self.gate.clocks[share] if self.consistency.asynchronous else store.version
        pending = self.incoming.get(share)
        if clock < due:  # applied already
            if not with_params:
                self.listener.send(peer, msg.reply(version=store.version, duplicate=True))
            elif self.consistency.asynchronous:  # what a read at the next clock sees
                self.reads.append(_Read(peer, msg, clock + 1, part.reply))
                self._release_reads()
            elif clock == store.version - 1:  # the values after that update are these
                extra: dict[str, Any] = {"scalars": self.last_scalars, "held_s": 0.0}
                if self.last_by:
                    extra["by"] = self.last_by
                self._send_params(peer, msg, part.reply, **extra)
            else:
                raise RefusedError(
                    f"push of share {share} for clock {clock} was applied long ago; the "
                    f"server is at version {store.version}",
                    code="stale",
                )
        elif not self.consistency.asynchronous and share in self.clock.pushes:
            if clock != store.version:
                return False  # too early: refused as such
            self._hold_or_ack(peer, msg, head, part, self.after_update)  # waits with the others
        elif pending is not None and (pending.clock, pending.worker) == (clock, worker):
            if head.seq not in pending.seqs:
                return False
            acks = pending.acks if self.consistency.asynchronous else None
            self._hold_or_ack(peer, msg, head, part, pending.replies, acks)
        else:
            return False
        log.info(
            "share %d's push for clock %d (part %d) again: not taken twice", share, clock, head.seq
        )
        return True

    def _hold_or_ack(
        self,
        peer: bytes,
        msg: Message,
        head: PushHeader,
        part: Part,
        replies: list[Reply],
        acks: list[tuple[bytes, Message]] | None = None,
    ) -> None:
        """A repeated message: answered with the others (``acks``: acknowledged with them)."""
        if head.reply_params:
            replies.append(Reply(part.priority, peer, msg, part.reply))
        elif acks is not None:
            acks.append((peer, msg))
        else:
            self.listener.send(peer, msg.reply(version=self._store().version, duplicate=True))

    def _check_clock(self, share: int, clock: int) -> None:
        """Refuse a push for any clock but the one this share's push is due for."""
        store = self._store()
        if self.consistency.asynchronous:
            expected = self.gate.clocks[share]
            if clock != expected:
                raise RefusedError(
                    f"push of share {share} for clock {clock}: expected clock {expected}",
                    code="duplicate" if clock < expected else "bad_clock",
                )
            return
        if clock != store.version:
            when = "after the server applied it" if clock < store.version else "too early"
            raise RefusedError(
                f"push of share {share} for clock {clock} arrived {when}; "
                f"the server is at version {store.version}",
                code="bad_clock",
            )
        if share in self.clock.pushes:
            raise RefusedError(f"share {share} was pushed for clock {clock}", code="duplicate")

    def _complete(self, share: int, push: PendingPush) -> None:
        """Every part of a share's push has arrived: apply it (SSP/ASP) or count it in."""
        replies = sorted(push.replies, key=lambda r: r.priority)
        if self.consistency.asynchronous:
            self._push_now(share, push, replies)
            return
        self.clock.pushes[share] = (push.weight, push.complete_grads)
        self.clock.scalars[share] = push.scalars
        self.clock.arrived[share] = time.monotonic()
        self.clock.pushed_by[share] = push.worker
        self.after_update.extend(replies)
        self._advance()

    def _pull(self, peer: bytes, msg: Message) -> None:
        store = self._store()
        worker = self._worker(msg)
        min_version = protocol.field(msg, "min_version", int, 0)
        keys = protocol.field(msg, "keys", (list, type(None)), None)
        if keys is not None:
            bad = [
                k
                for k in keys
                if not isinstance(k, int) or isinstance(k, bool) or k not in store.position
            ]
            if bad or len(keys) > len(store.chunks):
                raise RefusedError(f"pull: keys not held by this server: {bad[:5]}", code="bad_key")
        selection = Selection.of_pull(store, keys)
        _pull_codec(msg)
        if self.consistency.asynchronous:
            clock = protocol.field(msg, "clock", int, self.gate.clocks[worker])
            self.reads.append(_Read(peer, msg, clock, selection))
            self._release_reads()
            return
        if min_version > store.version + 1:
            raise RefusedError(
                f"pull for version {min_version}: the server is at {store.version} and only "
                "the next version can be waited for",
                code="bad_clock",
            )
        if min_version <= store.version:
            self._send_params(peer, msg, selection)
        else:
            self.parked.append((peer, msg, min_version, selection))

    def _read(self, peer: bytes, msg: Message) -> None:
        """A reader's request (a serving process, ``pslm.ps.client.reader``): chunks ``keys`` whole
        (none: only the version), taking no part in training. Under BSP ``min_version`` may
        ask for a version up to READ_AHEAD ahead, and the answer is sent as it is applied."""
        store = self._store()
        if not self.primary:
            raise RefusedError(f"the backup of shard {self.shard}: read its server", code="backup")
        keys = protocol.field(msg, "keys", list)
        if len(keys) > len(store.chunks) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k in store.position for k in keys
        ):
            raise RefusedError("read: keys not held by this server", code="bad_key")
        selection = Selection.of_pull(store, keys)
        min_version = protocol.field(msg, "min_version", int, 0)
        _pull_codec(msg)  # refuse a bad one now, not when the version comes
        if self.consistency.asynchronous or min_version <= store.version:
            self._send_params(peer, msg, selection, synchronous=not self.consistency.asynchronous)
        elif min_version <= store.version + protocol.READ_AHEAD:
            self.parked.append((peer, msg, min_version, selection))
        else:
            raise RefusedError(
                f"read for version {min_version}: the server is at {store.version}, and waits "
                f"for at most {protocol.READ_AHEAD} versions ahead",
                code="bad_clock",
            )

    def _fence(self, msg: Message) -> Message:
        """The leading worker changes the consistency model (``pslm ctl set consistency``):
        from ``clock`` on. Once every worker's push for clock - 1 is applied, this server
        switches, and the replies that let workers read at ``clock`` carry the new model
        (``mode``): every worker switches at that clock. The clock must lie beyond every read
        answered so far (under SSP the leader, stopped at its clock, picks one past the bound);
        from ASP, which has no bound, and to or from local SGD it is refused."""
        store = self._store()
        self._worker(msg)
        mode = Consistency.from_dict(protocol.field(msg, "consistency", dict))
        clock = protocol.field(msg, "clock", int)
        if "local" in (mode.kind, self.consistency.kind) or self.consistency.kind == "asp":
            raise RefusedError(
                f"cannot change the consistency model from {self.consistency} to {mode}: only "
                "between bsp and ssp, or to asp",
                code="refused",
            )
        reached = self.read_up_to if self.consistency.asynchronous else store.version
        if clock <= reached:
            raise RefusedError(
                f"a change at clock {clock} comes too late: reads at {reached} were answered",
                code="bad_clock",
            )
        self.fence = (clock, mode)
        log.info("switching from %s to %s at clock %d", self.consistency, mode, clock)
        return msg.reply(clock=clock)

    def _switch_if_due(self) -> dict[str, Any]:
        """Change the consistency model if the fence's clock is reached; returns what the
        replies sent now carry (``mode``), else nothing."""
        store = self._store()
        if self.fence is None:
            return {}
        clock, mode = self.fence
        at = self.gate.slowest if self.consistency.asynchronous else store.version
        if at < clock:
            return {}
        assert self.me is not None
        self.fence = None
        was, self.consistency = self.consistency, mode
        self.gate = StalenessGate(self.me.num_workers, mode.bound)
        self.gate.clocks = [clock] * self.me.num_workers
        if not mode.asynchronous:
            store.version = clock  # BSP: the version is the clock
            self.clock = Clock()
        self.read_up_to = clock - 1
        log.info("consistency model %s -> %s from clock %d", was, mode, clock)
        if self.backup is not None:
            self._sync()  # the backup takes the shard and the model whole
        return {"mode": mode.to_dict()}

    def _norm(self, msg: Message) -> None:
        assert self.me is not None
        store = self._store()
        server = protocol.field(msg, "server", int)
        clock = protocol.field(msg, "clock", int)
        sq = float(protocol.field(msg, "sq", (int, float)))
        if server == self.shard or not 0 <= server < self.me.num_servers:
            raise ProtocolError(f"norm from unknown server {server}")
        if sq < 0:  # inf and nan pass: a diverged model's norm, which every server must share
            raise ProtocolError(f"norm: negative squared norm {sq}")
        if clock == store.version:
            self.clock.norms[server] = sq
            self._advance()
        elif clock == store.version + 1:
            self.future_norms[server] = sq
        elif clock < store.version:
            log.debug("an old norm for clock %d from server %d (sent again)", clock, server)
        else:
            log.warning(
                "dropped a norm for clock %d from server %d (at %d)", clock, server, store.version
            )

    def _save(self, msg: Message) -> Message:
        """Write this shard (parameters, optimizer state) into an existing directory."""
        assert self.me is not None
        store = self._store()
        self._worker(msg)
        directory = Path(protocol.field(msg, "path", str))
        version = protocol.field(msg, "version", int)
        if version != store.version:
            raise RefusedError(
                f"save asked for version {version}; the server is at {store.version}",
                code="bad_clock",
            )
        if not directory.is_dir():
            raise RefusedError(f"save: {directory} is not a directory", code="bad_path")
        path = directory / shard_file(self.shard, self.me.num_servers)
        nbytes = store.save(path)
        log.info("saved version %d to %s (%d bytes)", version, path, nbytes)
        return msg.reply(version=version, file=str(path), bytes=nbytes)

    # --- SSP and ASP: every push is an update ----------------------------------------------

    def _push_now(self, share: int, push: PendingPush, replies: list[Reply]) -> None:
        """Apply one share's push at once, then answer it: acknowledge its parts (only now:
        the worker keeps no copy, so an acknowledged push must be on the backup too), and
        with parameters once the gate lets its pusher read at the next clock."""
        store = self._store()
        self._steer(push.scalars, newest_only=True)  # (clipping may have changed)
        multiplier = 1.0  # the worker's own mean gradient, clipped by its own norm
        if store.optimizer.clip_norm > 0 and push.sq_norm is not None:  # (checked on arrival
            # unless live settings changed clipping: a worker yet to learn of it sends none)
            multiplier = clip_coef(push.sq_norm, store.optimizer.clip_norm)
        fp32, _ = store.reduce([(1.0, push.complete_grads)])  # half-precision pushes -> fp32
        steered = self._in_force() if self.backup is not None else {}  # (for the backup)
        if not self._replicate(
            "async", fp32, multiplier, step=push.clock, share=share, scalars=steered
        ):
            return  # no answer: the requests go to the shard's new server
        self._make_params_writable()
        store.apply(fp32, multiplier, step=push.clock)
        self.gate.advance(share)
        for peer, msg in push.acks:
            self.listener.send(peer, msg.reply(version=store.version))
        for r in replies:
            self.reads.append(_Read(r.peer, r.msg, push.clock + 1, r.selection, push.scalars))
        self._release_reads()

    def _release_reads(self) -> None:
        """Answer every waiting read the staleness gate now lets through, each alone: one
        that fails is refused, the others are still answered (as ``_release_parked``)."""
        mode = self._switch_if_due()
        waiting, self.reads = self.reads, []
        for read in waiting:
            fenced = self.fence is not None and read.clock >= self.fence[0]
            if fenced or not self.gate.ready(read.clock):
                self.reads.append(read)
                continue
            staleness = self.gate.staleness(read.clock)
            extra: dict[str, Any] = {"staleness": staleness, **mode}
            if read.scalars is not None:
                extra["scalars"] = read.scalars
            send = partial(self._send_params, read.peer, read.msg, read.selection, **extra)
            if not self._alone(read.peer, read.msg, send):
                continue
            self.staleness_seen[staleness] = self.staleness_seen.get(staleness, 0) + 1
            self.read_up_to = max(self.read_up_to, read.clock)

    # --- BSP --------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Apply the current clock's update if everything it needs has arrived."""
        assert self.me is not None and self.store is not None
        store, clock = self.store, self.clock
        if len(clock.pushes) < self.me.num_workers:
            return
        scalars = _mean_scalars(clock)
        self._steer(scalars)  # the clock's live settings (the same on every server)
        if clock.grads is None:
            clock.grads, clock.factor = store.reduce(
                [clock.pushes[w] for w in sorted(clock.pushes)]
            )
            if store.optimizer.clip_norm > 0 and not self.local:
                sq = store.sq_norm(clock.grads) * clock.factor**2
                clock.norms[self.shard] = sq
                self.sent_norms[store.version] = sq
                for old in [c for c in self.sent_norms if c < store.version - 1]:
                    del self.sent_norms[old]
                for conn in self.peers.values():
                    self._send_norm(conn, store.version, sq)
        multiplier = clock.factor
        if store.optimizer.clip_norm > 0 and not self.local:
            if len(clock.norms) < self.me.num_servers:
                return
            total = sum(clock.norms[s] for s in range(self.me.num_servers))
            multiplier *= clip_coef(total, store.optimizer.clip_norm)
        by = [clock.pushed_by[s] for s in range(self.me.num_workers)]
        replicated = self._replicate(
            "local" if self.local else "bsp",
            clock.grads,
            multiplier,
            scalars=scalars,
            by=by,
            sq=self.sent_norms.get(store.version, -1.0),
        )
        if not replicated:
            return  # no answer: the requests go to the shard's new server
        self._make_params_writable()
        replies = sorted(self.after_update, key=lambda r: r.priority)  # next forward's first
        self.after_update = []
        said = {"scalars": scalars, "by": by}
        sent = 0
        try:
            if self.local:  # the pushes are parameter changes: average them in
                store.add_delta(clock.grads, multiplier)
            else:
                update = store.update(clock.grads, multiplier)
                if self.fence is None:  # (a change of model waits for the whole update)
                    for r in replies:  # each as soon as its chunks are updated
                        for lo, hi in r.selection.dense_spans(store):
                            update.span(lo, hi)
                        self._answer_alone(r, clock, version=store.version + 1, **said)
                        sent += 1
                update.finish()
        except Exception as exc:  # (the kernels do not fail on checked input: a bug's way
            # out, not a path a push can take) some chunks may be stepped and others not
            log.exception("update for clock %d failed", store.version)
            raise ShardFailed(
                f"shard {self.shard}: the update for clock {store.version} failed part-way "
                f"({exc!r}); leaving, so that the shard is served from its backup"
            ) from exc
        self.clock = Clock(norms=self.future_norms)
        self.future_norms = {}
        self.last_scalars, self.last_by = scalars, by
        mode = self._switch_if_due()  # (the replies tell the workers)
        for r in replies[sent:]:
            self._answer_alone(r, clock, version=store.version, **said, **mode)
        self._release_parked()

    def _release_parked(self) -> None:
        """Answer the parked pulls and reads whose version is reached, each alone: one that
        fails is refused, the others are still answered. After a switch to SSP or ASP, which
        wait for no version, the reads parked ahead are answered now, as ``_read`` answers
        them there (a pull asks for one version ahead at most: none is parked by then)."""
        store = self._store()
        asynchronous = self.consistency.asynchronous
        parked, self.parked = self.parked, []
        for peer, msg, min_version, selection in parked:
            if min_version > store.version and not asynchronous:
                self.parked.append((peer, msg, min_version, selection))
                continue
            read = {"synchronous": not asynchronous} if msg.op == "read" else {}
            self._alone(peer, msg, partial(self._send_params, peer, msg, selection, **read))

    def _alone(self, peer: bytes, msg: Message, answer: Callable[[], None]) -> bool:
        """Run ``answer`` (one of several replies due at once); if it fails, refuse ``msg``
        alone, so that the others go on (requests are checked on arrival: a bug's way out).
        Returns whether it was answered."""
        try:
            answer()
        except Exception as exc:
            log.exception("answering a %r failed", msg.op)
            self._refuse(peer, msg, getattr(exc, "code", "internal"), str(exc))
            return False
        return True

    def _answer_alone(self, r: Reply, clock: Clock, **said: Any) -> None:
        """``_answer``, or a refusal of this one reply (``_alone``): the update goes on."""
        self._alone(r.peer, r.msg, lambda: self._answer(r, clock, **said))

    def _answer(self, r: Reply, clock: Clock, **said: Any) -> None:
        """A push's reply with the parameters after its clock's update: the version, the
        clock's scalars and who pushed (``said``), and how long the server held the push."""
        held = time.monotonic() - clock.arrived[int(r.msg.body.get("share", r.msg.body["worker"]))]
        self._send_params(r.peer, r.msg, r.selection, held_s=round(held, 6), **said)

    def _send_params(
        self, peer: bytes, msg: Message, selection: Selection, **extra: object
    ) -> None:
        store = self._store()
        codec = _pull_codec(msg)
        tensors, shm = self.shared.reply(msg, store, selection.tensors(store))
        if not codec.lossless:  # a cast: new tensors, half the bytes
            tensors = [codec.encode(t)[0] for t in tensors]
        self.counts["bytes_out"] += sum(t.nbytes for t in tensors)
        body = {"version": store.version, **extra, **({"shm": True} if shm else {})}
        dense = selection.dense_only and codec.lossless and not shm  # the pieces as they are
        reply = Message("ok", id=msg.id, body=body, tensors=tensors)
        reply.wire = store.packed_wire if dense else None
        sent = self.listener.send(peer, reply, track=True)
        if sent is not None and not sent.done:
            self.trackers.append(sent)

    def _make_params_writable(self) -> None:
        """Make sure no earlier reply is still being read from the parameter memory.

        Replies are sent without copying. If ZeroMQ has not finished with all of them within
        READER_GRACE seconds (a slow or stalled reader), the shard moves its parameters to a
        fresh copy, leaving the old memory to those readers, so that nobody sees a half-updated
        chunk and nobody waits on a stalled peer.
        """
        store = self._store()
        deadline = time.monotonic() + READER_GRACE
        pending = [t for t in self.trackers if not t.done]
        for sent in pending:
            if not sent.wait(max(0.0, deadline - time.monotonic())):
                log.warning("a reader is slow; updating a copy of the parameters")
                store.relocate_params()
                break
        self.trackers = []

    # --- replication ------------------------------------------------------------------------

    def _follow(self, table: Table) -> None:
        """Act on the shard table: take over this shard, leave when another serves it, reach
        moved peers, and keep the backup (re)built."""
        if table == self.table:
            retry = self.primary and self.backup is None and self.backup_address
            if retry and time.monotonic() > self.retry_backup_at:  # one that fell behind
                self._connect_backup(self.backup_address)
            return
        old, self.table = self.table, table
        serving = table.servers[self.shard] == self.address
        if serving and not self.primary:
            self._promoted()
        elif not serving and self.primary and table.servers[self.shard]:
            log.error(
                "shard %d is served by %s now; leaving", self.shard, table.servers[self.shard]
            )
            self.demoted = True
            return
        elif not self.primary and table.backups[self.shard] != self.address:
            log.error("this server is no longer shard %d's backup; leaving", self.shard)
            self.demoted = True
            return
        for s, addr in enumerate(table.servers):
            if s != self.shard and addr and (old is None or old.servers[s] != addr):
                log.warning("shard %d is served by %s now", s, addr)
                self.peers[s].close()
                self.peers[s] = Connection(addr, send_timeout=self.cfg.timeout)
                for clock, sq in self.sent_norms.items():  # what it may have missed
                    self._send_norm(self.peers[s], clock, sq)
        if self.primary and table.backups[self.shard] != self.backup_address:
            self._drop_backup()
            self.backup_address = table.backups[self.shard]
            if self.backup_address:
                self._connect_backup(self.backup_address)

    def _promoted(self) -> None:
        self.primary = True
        log.warning(
            "serving shard %d from version %s on",
            self.shard,
            self.store.version if self.store else "(none)",
        )
        for conn in self.peers.values():
            for clock, sq in self.sent_norms.items():
                self._send_norm(conn, clock, sq)

    def _send_norm(self, conn: Connection, clock: int, sq: float) -> None:
        try:
            conn.send(Message("norm", body={"server": self.shard, "clock": clock, "sq": sq}))
        except PSLMError as exc:  # the peer is gone: its successor gets it when it appears
            log.warning("could not send a norm: %s", exc)

    def _connect_backup(self, address: str) -> None:
        def gone() -> bool:  # the scheduler declared it dead: do not wait for it any longer
            table = self.beat.table if self.beat is not None else None
            return table is not None and table.backups[self.shard] != address

        assert self.me is not None  # a backup that cannot keep up is dropped, not waited for
        timeout = min(self.cfg.timeout, max(5.0, 2 * self.me.heartbeat_timeout))
        self.backup = BackupLink(address, timeout=timeout, gone=gone)
        log.info("shard %d's backup is %s", self.shard, address)
        if self.store is not None:
            self._sync()

    def _drop_backup(self) -> None:
        if self.backup is not None:
            self.backup.close()
            self.backup = None
            assert self.me is not None
            self.retry_backup_at = time.monotonic() + self.me.heartbeat_timeout

    def _sync(self) -> None:
        """Send the backup the whole shard."""
        store = self._store()
        assert self.backup is not None
        snap = Snapshot(
            store=store,
            consistency=self.consistency,
            clocks=list(self.gate.clocks),
            scalars=self.last_scalars,
            by=self.last_by,
            norms=self.sent_norms,
        )
        try:
            self.backup.request(sync_message(self.shard, snap))
        except PSLMError as exc:
            log.error("could not copy shard %d to its backup: %s", self.shard, exc)
            self._drop_backup()
            self._report_backup("lost")
            return
        log.info("shard %d (version %d) copied to its backup", self.shard, store.version)
        self._report_backup("ready")

    def _report_backup(self, state: str) -> bool:
        """Tell the scheduler this shard's backup is ``ready`` (a whole copy: it may be
        promoted) or ``lost``; returns whether this server still serves the shard (if not, it
        leaves: another took over while it was cut off)."""
        assert self.me is not None
        body = {
            "node": self.me.node_id,
            "shard": self.shard,
            "state": state,
            "address": self.backup_address,
        }
        try:
            reply = self.scheduler.request("scheduler", Message("backup", body=body))
        except PSLMError as exc:
            log.warning("could not tell the scheduler the backup is %s: %s", state, exc)
            return True
        if not reply.body.get("serving", True):
            log.error("shard %d is served by another server now; leaving", self.shard)
            self.demoted = True
            return False
        return True

    def _replicate(self, kind: str, grads: list[Grad], multiplier: float, **extra: Any) -> bool:
        """Have the backup take the update about to be applied; return once it confirmed, or
        was dropped for not doing so in time (the shard goes on without a copy). False if
        this server must not apply it: another one serves the shard now."""
        if self.backup is None:
            return True
        store = self._store()
        update = Update(
            kind=kind,
            version=store.version,
            multiplier=multiplier,
            grads=grads,
            step=extra.pop("step", store.version),
            **extra,
        )
        for attempt in (1, 2):
            try:
                self.backup.request(update_message(update))
                return True
            except RefusedError as exc:
                if attempt == 2 or exc.code != "not_synced":
                    log.error("shard %d's backup refused an update: %s", self.shard, exc)
                    break
                self._sync()  # then the update again
                if self.backup is None or self.demoted:
                    return not self.demoted
            except PSLMError as exc:
                log.error("shard %d's backup did not confirm an update: %s", self.shard, exc)
                break
        self._drop_backup()
        return self._report_backup("lost")

    def _take_sync(self, msg: Message) -> Message:
        """A backup: take the whole shard from its server."""
        assert self.me is not None
        if self.primary:
            raise RefusedError(f"this server serves shard {self.shard}; it is no backup")
        snap = read_sync(msg, self.shard, self.me.num_workers)
        self.store, self.consistency = snap.store, snap.consistency
        self.gate = StalenessGate(self.me.num_workers, snap.consistency.bound)
        self.gate.clocks = snap.clocks
        self.last_scalars, self.last_by, self.sent_norms = snap.scalars, snap.by, snap.norms
        log.info("took shard %d at version %d from its server", self.shard, snap.store.version)
        return msg.reply(version=snap.store.version)

    def _take_update(self, peer: bytes, msg: Message) -> None:
        """A backup: confirm an update of its server, then apply it the same way."""
        assert self.me is not None
        if self.primary or self.store is None:
            raise RefusedError("this server holds no copy to update", code="not_synced")
        store = self.store
        update = read_update(msg, store, self.me.num_workers)
        self.listener.send(peer, msg.reply(version=update.version))
        try:
            update.apply(store)
        except Exception as exc:  # (a bug's way out) this copy is half one version: the
            # backup leaves and is dropped (its server, failing alike, leaves too: the shard
            # is lost and the job goes back to its checkpoint)
            log.exception("applying update %d failed", update.version)
            raise ShardFailed(
                f"backup of shard {self.shard}: applying update {update.version} failed "
                f"part-way ({exc!r}); leaving"
            ) from exc
        # norms that came meanwhile were for the clock just applied or the next (as in
        # _advance); the backup gathers none of its own
        self.clock = Clock(norms=self.future_norms)
        self.future_norms = {}
        if update.kind == "async":
            self.gate.advance(update.share)
        else:
            self.last_scalars, self.last_by = update.scalars, update.by
            if update.sq >= 0:
                self.sent_norms = {update.version: update.sq}

    # --- helpers ----------------------------------------------------------------------------

    def _steer(self, scalars: dict[str, float], *, newest_only: bool = False) -> None:
        """Put the live settings a push (SSP/ASP) or a clock (BSP) carries in force
        (``pslm.ps.core.steering``; SSP/ASP: only if no newer ones are)."""
        store = self._store()
        version = scalars.get(IN_FORCE)
        if version is not None and not (newest_only and version < self.steered):
            changed = store.override(optimizer_settings(scalars))
            if changed:
                log.info("from version %d on: %s (live settings)", store.version, changed)
            self.steered = version

    def _in_force(self) -> dict[str, float]:
        """Scalars that describe the live settings in force, for the backup."""
        optimizer = self._store().optimizer
        return {f"min.{k}": float(getattr(optimizer, k)) for k in SETTINGS.values()}

    def _stats(self) -> dict[str, float]:
        """What the heartbeats report (read from their thread: plain numbers)."""
        store = self.store
        return {
            **{k: float(v) for k, v in self.counts.items()},
            "version": float(store.version) if store is not None else -1.0,
            "shard": float(self.shard),
            "primary": float(self.primary),
            "params": float(sum(c.length for c in store.chunks)) if store is not None else 0.0,
        }

    def _store(self) -> ShardStore:
        if self.store is None:
            raise RefusedError(
                "the server is not initialised yet: call init first", code="not_initialised"
            )
        return self.store

    def _worker(self, msg: Message) -> int:
        assert self.me is not None
        worker = protocol.field(msg, "worker", int)
        if not 0 <= worker < self.me.num_workers:
            raise ProtocolError(f"{msg.op}: worker {worker} is not in [0, {self.me.num_workers})")
        return worker

    def _leave(self) -> None:
        if self.me is None:
            return
        try:
            self.scheduler.request(
                "scheduler", Message("leave", body={"node": self.me.node_id}), timeout=2.0
            )
        except PSLMError as exc:
            log.debug("could not say goodbye to the scheduler: %s", exc)


def _pull_codec(msg: Message) -> Codec:
    return get_codec(protocol.pull_codec(protocol.field(msg, "pull_codec", str, "none")))


def shard_file(rank: int, num_servers: int) -> str:
    """The file name of server ``rank``'s part of a checkpoint."""
    return f"shard-{rank:03d}-of-{num_servers:03d}.safetensors"


def _mean_scalars(clock: Clock) -> dict[str, float]:
    """Each scalar's mean over the shares that sent it, weighted by their push weights, in
    share order (the same sum every run); names starting ``min.`` take the minimum."""
    sums: dict[str, list[float]] = {}
    least: dict[str, float] = {}
    for worker in sorted(clock.scalars):
        weight = clock.pushes[worker][0]
        for name, value in clock.scalars[worker].items():
            if name.startswith("min."):
                least[name] = min(value, least.get(name, value))
                continue
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += weight * value
            acc[1] += weight
    return {**{name: total / w for name, (total, w) in sums.items()}, **least}


def _advertised(bound: str, advertise: str) -> str:
    """The address peers should use: ``advertise`` (with the bound port if it has none)."""
    port = bound.rpartition(":")[2]
    if not advertise:
        return bound
    if advertise.rpartition(":")[2].isdigit() and ":" in advertise.removeprefix("tcp://"):
        return tcp_address(advertise)
    return tcp_address(f"{advertise.removeprefix('tcp://')}:{port}")
