"""A server process: registers, then serves one shard - as its server or as its backup - until
the scheduler shuts the cluster down.

    cfg = ServerConfig(scheduler="tcp://127.0.0.1:9000")
    serve(cfg)          # blocks; returns the process's exit code

The request loop takes one message at a time and hands it to the handler of its op; the
shard's rules (``serving``: push intake, the BSP round, SSP/ASP) decide and answer. A share is
a part of every global batch: share r is worker r's until the scheduler leases it to another
worker (its worker died); the server does not care who pushes a share, only that each is taken
once a clock.

Replication (``replicas`` 1 at the scheduler): each shard has a backup, a server process of
its own that keeps a copy of the shard. The server sends it the whole shard when it appears
(``sync``) and then every update before applying it (``update``: the reduced gradient, its
multiplier, where it goes), and answers no push until the backup has confirmed: an update a
worker has seen is on two servers. The backup applies the same kernels to the same inputs, so
its copy is bit for bit the server's. When the server dies the scheduler promotes the backup
in the shard table, which every node follows through its heartbeats: the backup serves the
shard from then on, and the workers send it every request that had no answer (duplicates are
recognised as such: exactly once).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pslm.errors import (
    ClusterError,
    ConfigError,
    ProtocolError,
    PSLMError,
    RefusedError,
    ShardFailed,
)
from pslm.ps.control.node import Heartbeat, Membership, register
from pslm.ps.control.table import Table
from pslm.ps.core import protocol
from pslm.ps.server.replica import Replication, mirror, read_update
from pslm.ps.server.replies import Outbox, Replies
from pslm.ps.server.serving import ShardService
from pslm.ps.server.setup import initialise, save, within
from pslm.ps.server.shm import SharedPaths
from pslm.ps.server.state import ShardState
from pslm.wire.message import DEFAULT_MAX_MESSAGE, Message
from pslm.wire.peerlog import PeerLog
from pslm.wire.transport import Channel, Connection, Listener, Poller, readable, tcp_address

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
    run_dir: str = ""
    """The job's run directory: ``save`` writes and ``init`` restores only inside it (empty:
    anywhere, for a server started by hand for a job without one)."""

    def __post_init__(self) -> None:
        try:
            self.scheduler = tcp_address(self.scheduler)
            self.bind = tcp_address(self.bind)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.timeout <= 0 or self.register_timeout <= 0:
            raise ConfigError("timeouts must be positive")


MAX_HELD = 1024
"""Workers' requests a backup holds until the shard table promotes it (more are refused)."""


class Role(enum.Enum):
    """What a server is to its shard."""

    SERVING = "serving"
    """It serves the shard (its primary)."""
    BACKUP = "backup"
    """It keeps a copy of the shard, to serve it once the shard table says so."""
    DEMOTED = "demoted"
    """Another server serves the shard now (this one was thought dead): it leaves."""
    STOPPING = "stopping"
    """The cluster shuts down."""


def serve(cfg: ServerConfig) -> int:
    """Register with the scheduler, serve until told to stop, leave. Returns the exit code."""
    listener = Listener(cfg.bind, max_bytes=cfg.max_message_bytes)
    address = advertised(listener.address, cfg.advertise)
    scheduler = Channel(timeout=cfg.timeout, role="server")
    try:
        scheduler.connect("scheduler", cfg.scheduler)
        me = register(
            scheduler,
            role="server",
            rank=cfg.rank,
            address=address,
            timeout=cfg.register_timeout,
        )
        try:
            return Server(cfg, me, listener, scheduler, address).run()
        finally:
            # registered: the scheduler hears that this server leaves, however it ends (a
            # Ctrl-C before the loop began used to leave it to be declared dead)
            leave(scheduler, me.node_id)
    finally:
        scheduler.close()
        listener.close()


class Server:
    """One registered server's request loop. Single-threaded (heartbeats have their own)."""

    def __init__(
        self,
        cfg: ServerConfig,
        me: Membership,
        listener: Listener,
        scheduler: Channel,
        address: str,
        *,
        outbox: Outbox | None = None,
    ):
        """``outbox``: where replies go (default: ``listener``; a test may record them)."""
        self.cfg = cfg
        self.me = me
        self.listener = listener
        self.scheduler = scheduler
        self.address = address
        self.shard = me.shard
        self.role = Role.SERVING if me.primary else Role.BACKUP
        self.table = Table(-1, me.servers, me.backups)
        self.beat: Heartbeat | None = None
        self.peers = {
            r: Connection(addr, send_timeout=cfg.timeout, role="server")
            for r, addr in enumerate(me.servers)
            if r != self.shard
        }
        self.replication = Replication(
            shard=self.shard,
            node_id=me.node_id,
            scheduler=scheduler,
            # a backup that cannot keep up is dropped, not waited for
            timeout=min(cfg.timeout, max(5.0, 2 * me.heartbeat_timeout)),
            retry_after=me.heartbeat_timeout,
            backups=lambda: self.beat.table.backups if self.beat and self.beat.table else None,
        )
        self.shared = SharedPaths()
        self.replies = Replies(outbox or listener, self.shared)
        self.service = ShardService(
            shard=self.shard,
            num_workers=me.num_workers,
            num_servers=me.num_servers,
            replies=self.replies,
            replication=self.replication,
            peers=self.peers,
        )
        self.held: list[tuple[bytes, Message]] = []
        """Workers' requests that reached this backup before the table promoted it."""
        self.counts = {"bytes_in": 0, "messages": 0}
        """Tensor bytes received and messages taken (reported with heartbeats)."""
        self.bad = PeerLog(log)
        """Bad messages, logged once per peer per minute."""
        self.handlers: dict[str, Callable[[bytes, Message], None]] = {
            "init": self._init,
            "push": self._from_worker(lambda p, m, w: self.service.push(p, m)),
            "pull": self._from_worker(self.service.pull),
            "save": self._from_worker(lambda p, m, w: self.replies.send(p, self._save(m))),
            "fence": self._from_worker(lambda p, m, w: self.replies.send(p, self.service.fence(m))),
            "attach": self._from_worker(self._attach, promotes=False),
            "read": self._read,
            "norm": lambda peer, msg: self.service.norm(msg),
            "sync": self._take_sync,
            "update": self._take_update,
        }

    def run(self) -> int:
        """Serve until told to stop; returns the process exit code."""
        log.info(
            "%s listening on %s: %s of shard %d",
            self.me.node_id,
            self.address,
            "server" if self.role is Role.SERVING else "backup",
            self.shard,
        )
        beat = Heartbeat(
            self.cfg.scheduler,
            self.me.node_id,
            self.me.heartbeat_interval,
            lost_after=2 * self.me.heartbeat_timeout,
            stats=self._stats,
        )
        beat.start()
        self.beat = beat
        try:
            return self._loop(beat)
        finally:
            beat.close()
            seen = self.service.reads.seen
            if seen:
                log.info("staleness of reads (staleness: count): %s", dict(sorted(seen.items())))
            for conn in self.peers.values():
                conn.close()
            self.replication.close()

    def _loop(self, beat: Heartbeat) -> int:
        poller = Poller(self.listener)
        sched_socket = self.scheduler.socket("scheduler")
        while True:
            for _ in poller.poll(0.2):
                self._serve_one()
            if readable(sched_socket):
                for notice in self.scheduler.drain("scheduler"):
                    if notice.op == "shutdown":
                        self.role = Role.STOPPING
            if beat.table is not None and self.role is not Role.STOPPING:
                self._follow(beat.table)
            if not self.replication.serving:
                self.role = Role.DEMOTED
            if self.held and self.role is not Role.BACKUP:
                self._release_held()
            if self.role is Role.DEMOTED:
                return protocol.DEMOTED
            if self.role is Role.STOPPING or beat.stop_requested.is_set():
                log.info("%s shutting down", self.me.node_id)
                return 0
            if beat.lost.is_set():
                log.error("lost the scheduler at %s; exiting", self.cfg.scheduler)
                return 1

    def _serve_one(self) -> None:
        try:
            peer, msg = self.listener.recv()
        except ProtocolError as exc:
            self.bad.warning(exc.sender, "bad message: %s", exc)
            if exc.sender is not None and exc.request_id:
                self.listener.send(exc.sender, protocol.error(exc.request_id, "protocol", str(exc)))
            return
        self.counts["bytes_in"] += sum(t.nbytes for t in msg.tensors)
        self.counts["messages"] += 1
        self.handle(peer, msg)

    def handle(self, peer: bytes, msg: Message) -> None:
        """Hand ``msg`` to its op's handler; a refusal goes back to ``peer``."""
        try:
            handler = self.handlers.get(msg.op)
            if handler is None:
                raise ProtocolError(f"unknown op {msg.op!r}")
            protocol.check_sender(msg)  # (a worker's bug cannot send a server's norm)
            handler(peer, msg)
        except ShardFailed:
            raise  # (the server leaves: answering on would serve a shard half-stepped)
        except (ProtocolError, ConfigError, ClusterError) as exc:
            if isinstance(exc, ProtocolError):  # (refusals are a peer's business; this a bug)
                self.bad.warning(peer, "refused a %r: %s", msg.op, exc)
            self.replies.refuse(peer, msg, getattr(exc, "code", "refused"), str(exc))
        except Exception as exc:  # a bug must not take the shard down with it
            log.exception("internal error on %r", msg.op)
            self.replies.refuse(peer, msg, "internal", f"internal server error: {exc!r}")

    def _from_worker(
        self, handler: Callable[[bytes, Message, int], None], *, promotes: bool = True
    ) -> Callable[[bytes, Message], None]:
        """A handler of a worker's request, given the checked ``worker`` field."""

        def checked(peer: bytes, msg: Message) -> None:
            if self.role is Role.BACKUP:
                if not promotes:
                    raise RefusedError(f"{msg.op}: this server is a backup", code="no_shm")
                self._early(peer, msg)
                return
            worker = protocol.field(msg, "worker", int)
            if not 0 <= worker < self.me.num_workers:
                n = self.me.num_workers
                raise ProtocolError(f"{msg.op}: worker {worker} is not in [0, {n})")
            handler(peer, msg, worker)

        return checked

    # --- requests on the shard as a whole ---------------------------------------------------

    def _init(self, peer: bytes, msg: Message) -> None:
        """Worker 0's first request: the key space, optimizer, consistency model and values
        (or a checkpoint to restore). The same again is answered as the first was."""
        self._from_worker(lambda p, m, w: self.replies.send(p, self._initialise(m)))(peer, msg)

    def _initialise(self, msg: Message) -> Message:
        current = self.service.state if self.service.initialised else None
        shape = {"shard": self.shard, "num_servers": self.me.num_servers}
        within(protocol.field(msg, "restore", str, ""), self.cfg.run_dir, "init: restore")
        state = initialise(msg, current, num_workers=self.me.num_workers, **shape)
        if state is None:  # the same again
            return msg.reply(version=self.service.state.store.version)
        self.service.state = state
        self.replication.sync(state)
        return msg.reply(version=state.store.version)

    def _save(self, msg: Message) -> Message:
        store = self.service.state.store
        within(protocol.field(msg, "path", str), self.cfg.run_dir, "save")
        return save(msg, store, shard=self.shard, num_servers=self.me.num_servers)

    def _attach(self, peer: bytes, msg: Message, worker: int) -> None:
        """A worker on this machine offers shared memory (``pslm.ps.client.shm``)."""
        self.replies.send(peer, self.shared.attach(msg, worker, self.service.state.store))

    def _read(self, peer: bytes, msg: Message) -> None:
        """A reader's request (``pslm.ps.client.reader``); a backup sends it to its server."""
        if self.role is not Role.SERVING and self.service.initialised:
            raise RefusedError(f"the backup of shard {self.shard}: read its server", code="backup")
        self.service.read(peer, msg)

    # --- the backup's side ------------------------------------------------------------------

    def _take_sync(self, peer: bytes, msg: Message) -> None:
        """A backup: take the whole shard from its server."""
        if self.role is Role.SERVING:
            raise RefusedError(f"this server serves shard {self.shard}; it is no backup")
        held = self.service.state.store.nbytes if self.service.initialised else 0
        state = ShardState.from_message(msg, self.shard, self.me.num_workers, replaces=held)
        self.service.state = state
        log.info("took shard %d at version %d from its server", self.shard, state.store.version)
        self.replies.send(peer, msg.reply(version=state.store.version))

    def _take_update(self, peer: bytes, msg: Message) -> None:
        """A backup: confirm an update of its server, then apply it the same way."""
        if self.role is Role.SERVING or not self.service.initialised:
            raise RefusedError("this server holds no copy to update", code="not_synced")
        state = self.service.state
        update = read_update(msg, state.store, self.me.num_workers)
        self.replies.send(peer, msg.reply(version=update.version))
        mirror(update, state, self.shard)
        # norms that came meanwhile were for the clock just applied or the next (as in
        # the server's round); the backup gathers none of its own
        self.service.round = self.service.norms.next_round()

    # --- the shard table --------------------------------------------------------------------

    def _early(self, peer: bytes, msg: Message) -> None:
        """A worker's request reached this backup: workers come here once the shard table
        promotes it, which this server may not have heard yet. It is held until the table
        says this server serves the shard (then handled), or refused when this server
        leaves; a stray request promotes nothing."""
        table = self.beat.table if self.beat is not None else None
        if table is not None:
            self._follow(table)
        if self.role is Role.SERVING:  # promoted: the request is handled now
            self.handle(peer, msg)
            return
        if len(self.held) >= MAX_HELD:
            raise RefusedError(f"the backup of shard {self.shard} holds no more", code="backup")
        self.held.append((peer, msg))

    def _release_held(self) -> None:
        """Handle the requests held while this server was a backup (it serves now), or
        refuse them (it leaves)."""
        held, self.held = self.held, []
        for peer, msg in held:
            if self.role is Role.SERVING:
                self.handle(peer, msg)
            else:
                why = f"the backup of shard {self.shard} leaves without serving it"
                self.replies.refuse(peer, msg, "backup", why)

    def _follow(self, table: Table) -> None:
        """Act on the shard table: take over this shard, leave when another serves it, reach
        moved peers, and keep the backup (re)built."""
        serving = self.role is Role.SERVING
        state = self.service.state if self.service.initialised else None
        if table == self.table:
            if serving:  # a backup that fell behind, connected again after a while
                self.replication.retry(state)
            return
        old, self.table = self.table, table
        here = table.servers[self.shard] == self.address
        if here and not serving:
            self._promoted()
        elif not here and serving and table.servers[self.shard]:
            log.error(
                "shard %d is served by %s now; leaving", self.shard, table.servers[self.shard]
            )
            self.role = Role.DEMOTED
            return
        elif not serving and table.backups[self.shard] != self.address:
            log.error("this server is no longer shard %d's backup; leaving", self.shard)
            self.role = Role.DEMOTED
            return
        for s, addr in enumerate(table.servers):
            if s != self.shard and addr and old.servers[s] != addr:
                log.warning("shard %d is served by %s now", s, addr)
                self.peers[s].close()
                self.peers[s] = Connection(addr, send_timeout=self.cfg.timeout, role="server")
                self.service.send_norms(self.peers[s])  # what it may have missed
        if self.role is Role.SERVING:
            self.replication.follow(table.backups[self.shard], state)

    def _promoted(self) -> None:
        self.role = Role.SERVING
        version = self.service.state.store.version if self.service.initialised else "(none)"
        log.warning("serving shard %d from version %s on", self.shard, version)
        for conn in self.peers.values():
            self.service.send_norms(conn)

    # --- the rest ---------------------------------------------------------------------------

    def _stats(self) -> dict[str, float]:
        """What the heartbeats report (read from their thread: plain numbers)."""
        state = self.service._state
        store = state.store if state is not None else None
        return {
            **{k: float(v) for k, v in self.counts.items()},
            "bytes_out": float(self.replies.bytes_out),
            "version": float(store.version) if store is not None else -1.0,
            "shard": float(self.shard),
            "primary": float(self.role is Role.SERVING),
            "params": float(sum(c.length for c in store.chunks)) if store is not None else 0.0,
        }


def leave(scheduler: Channel, node_id: str) -> None:
    """Tell the scheduler this server leaves (2 s at most: it may be gone)."""
    try:
        scheduler.request("scheduler", Message("leave", body={"node": node_id}), timeout=2.0)
    except PSLMError as exc:
        log.debug("could not say goodbye to the scheduler: %s", exc)


def advertised(bound: str, advertise: str) -> str:
    """The address peers should use: ``advertise`` (with the bound port if it has none)."""
    port = bound.rpartition(":")[2]
    if not advertise:
        return bound
    if advertise.rpartition(":")[2].isdigit() and ":" in advertise.removeprefix("tcp://"):
        return tcp_address(advertise)
    return tcp_address(f"{advertise.removeprefix('tcp://')}:{port}")
