"""The worker side of the parameter server: init, push, pull, wait (ps-lite's KVWorker).

    with PSClient(ClientConfig(scheduler="tcp://127.0.0.1:9000")) as ps:
        params = dict(model.named_parameters())
        ps.init({n: p.data for n, p in params.items()}, OptimizerConfig(name="adamw", lr=1e-3))
        for step in range(steps):
            loss = model(batch(step)).backward()
            grads = {n: p.grad for n, p in params.items()}
            ps.wait(ps.push_pull(grads, {n: p.data for n, p in params.items()}, clock=step))

``push``, ``pull`` and ``push_pull`` return a timestamp at once; ``wait(ts)`` blocks until that
request is complete (every call has a timeout and raises ``RequestTimeout`` when it expires).
Each sends one message per server per call, carrying all of that server's chunks.

A PSClient is not thread-safe: use it from the thread that made it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple

import torch

from pslm.errors import ClusterError, ConfigError, Interrupted, ProtocolError
from pslm.ps.client.layout import Expect, Plan, Slot, copy_run, gather, runs_of, signature, sq_norm
from pslm.ps.client.shm import WorkerMemory
from pslm.ps.control.leases import Leases
from pslm.ps.control.node import Heartbeat, Membership, register
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import DEFAULT_CHUNK_BYTES, KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.core.push import PushHeader, check_codecs
from pslm.ps.core.steering import Steering
from pslm.wire.codecs import ErrorFeedback, get_codec
from pslm.wire.message import Message
from pslm.wire.shm import available as shm_available
from pslm.wire.transport import Channel, tcp_address, tune_allocator

log = logging.getLogger("pslm.client")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BSP = Consistency()


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


def scalars_for(server: int, scalars: Mapping[str, float] | None) -> dict[str, float]:
    """The scalars a push sends ``server``: server 0 alone averages the others (one is
    enough), and every server takes the ``min.`` ones (live settings it applies itself)."""
    return {k: float(v) for k, v in (scalars or {}).items() if server == 0 or k.startswith("min.")}


class Completion(NamedTuple):
    """What ``wait`` returns."""

    version: int
    """The servers' parameter version (the lowest, if they differ)."""
    scalars: dict[str, float]
    """For ``push_pull``: each pushed scalar averaged over the workers, weighted."""
    held_s: float
    """For ``push_pull``: the longest time a server held this push before answering (waiting
    for the other workers and applying the update)."""
    bytes_sent: int
    """Tensor bytes this request sent (over the socket or through shared memory)."""
    bytes_received: int
    """Tensor bytes its replies brought back (the same)."""
    staleness: int = 0
    """SSP/ASP reads: how many steps behind this worker the slowest worker was (the most
    updates the values may miss)."""
    trained_by: tuple[int, ...] = ()
    """BSP push_pull: the worker whose push of each share the update took, by share."""


@dataclass(slots=True)
class _Request:
    ids: dict[int, int]  # request id -> server rank
    expect: dict[int, Expect]  # request id -> what its reply carries
    out: Mapping[str, torch.Tensor] | None
    sent: int = 0  # tensor bytes
    shared: tuple[int, ...] = ()  # servers it went to through shared memory
    plan: Plan | None = None  # a planned push_pull: where its replies go
    parts: dict[int, int] = field(default_factory=dict)  # request id -> part (planned parts)


def on_this_machine(address: str) -> bool:
    """Whether ``address`` (tcp://host:port) is a loopback address or one of this host's."""
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        if host == "localhost":
            return True
    try:
        return host in {socket.gethostname(), *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError:
        return False


class PSClient:
    """A worker's connection to a pslm cluster.

    Creating one registers with the scheduler and blocks until the whole cluster has
    registered (at most ``register_timeout``).
    """

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        if cfg.tune_allocator:
            tune_allocator()
        self.channel = Channel(timeout=cfg.timeout)
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
        self.keyspace: KeySpace | None = None
        self.consistency = BSP
        self._clipped = False
        self.feedback = ErrorFeedback(get_codec("none"))
        self.pull_codec = "none"
        self.memory: WorkerMemory | None = None
        """Shared memory with the servers on this machine (``init``'s ``shm``)."""
        self._layout: list[list[Slot]] = []
        self._requests: dict[int, _Request] = {}
        self._next_ts = 1
        self._closed = False
        self.servers = list(self.me.servers)
        """Where each shard is served now (it moves when a server dies and its backup takes
        over: ``follow_servers``)."""
        self._table = -1
        self._waiting = False  # in wait(): for servers' replies
        self._retained: dict[int, list[tuple[int, Message]]] = {}
        """Server -> plain pushes (clock, message) it acknowledged but may not have applied
        yet, with copies of their tensors: sent again to a server that takes the shard over."""
        self._epoch = self.me.epoch
        self.channel.watch = self.follow_servers
        self._steering = Steering()
        self._plan: Plan | None = None
        """The last push_pull's Plan (``_planned``)."""
        self._no_plan: list[Any] = []
        """The signature of the last pair of mappings no plan could be made for."""

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

    def leases(self) -> Leases:
        """Who holds each share of the global batch now (``pslm.ps.control.leases``). Blocks for one
        round trip to the scheduler."""
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

    def follow_servers(self) -> None:
        """Send to a shard's new server (its promoted backup) from now on, and send it again
        every request its old server left unanswered; the servers take duplicates as such.
        Cheap (the table comes with the heartbeats); called while waiting and before sends."""
        if self._waiting and self.heartbeat.stop_requested.is_set():
            raise ClusterError("the cluster is stopping (a shard was lost, or shutdown)")
        epoch = self.heartbeat.epoch
        if epoch and epoch != self._epoch:  # a new scheduler: what the old one left unanswered
            self._epoch = epoch
            again = self.channel.reroute("scheduler", self.cfg.scheduler)
            log.warning("the scheduler restarted; %d requests sent to it again", again)
        table = self.heartbeat.table
        if table is None or table.version == self._table:
            return
        self._table = table.version
        for s, addr in enumerate(table.servers):
            if addr and addr != self.servers[s]:
                self.servers[s] = addr
                if self.memory is not None:
                    self.memory.drop(s)  # the socket from now on: the new server may be elsewhere
                again = self.channel.reroute(f"server-{s}", addr, partial(self._unshare, s))
                for _, msg in self._retained.get(s, []):
                    self.channel.send_unawaited(f"server-{s}", msg)
                    again += 1
                log.warning("shard %d is served by %s now; %d requests sent again", s, addr, again)

    def steering(self, version: int | None = None) -> Steering:
        """The newest version of the job's live settings this worker has heard of (from the
        scheduler's notices and heartbeats; cheap), or with ``version`` that version, asked
        of the scheduler (one round trip)."""
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

    def fence(self, clock: int, consistency: Consistency) -> None:
        """Have every server change to ``consistency`` from ``clock`` on (``pslm ctl set
        consistency``; the servers' ``fence``): the replies that let the workers read at
        ``clock`` carry it, and each worker's client takes it then (``consistency``).
        RefusedError if a server cannot (see the server's ``_fence``)."""
        body = {"worker": self.rank, "clock": clock, "consistency": consistency.to_dict()}
        ids = [
            self.channel.send(f"server-{s}", Message("fence", body=body))
            for s in range(self.num_servers)
        ]
        self.channel.wait(ids)

    def report(self, name: str, value: float) -> None:
        """A number the heartbeats report to the scheduler from now on (``pslm ctl status``
        shows them)."""
        self._stats[name] = value

    def set_clipping(self, on: bool) -> None:
        """Whether the optimizer clips now (``pslm ctl set clip=...`` changed it): SSP/ASP
        pushes then carry their squared norm."""
        self._clipped = on

    @property
    def clips_each_push(self) -> bool:
        """SSP/ASP with clipping: every push carries its own squared norm and is clipped by
        it."""
        return self.consistency.asynchronous and self._clipped

    # --- setup ------------------------------------------------------------------------------

    def init(
        self,
        tensors: Mapping[str, torch.Tensor],
        optimizer: OptimizerConfig,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        decay_1d: bool = False,
        consistency: Consistency = BSP,
        push_codec: str = "none",
        pull_codec: str = "none",
        rows: Sequence[str] = (),
        restore: str = "",
        clock: int = 0,
        shm: bool = True,
    ) -> None:
        """Declare the parameters and give the servers their initial values, optimizer and
        consistency model. ``push_codec`` compresses gradients (none, bf16, fp16, int8,
        topk:RATIO; lossy ones with error feedback kept here), ``pull_codec`` parameters (none,
        bf16, fp16). The tensors named in ``rows`` (e.g. an untied token embedding) are row
        tensors: pushes carry only the rows a step touched and bring back only the rows the
        next step needs (``push_pull``'s ``rows``), and the servers update them with lazy
        Adam, as ``torch.optim.SparseAdam``.

        Every worker calls it with tensors of the same names and shapes, in the same order;
        worker 0's values become the parameters, and on return every worker's ``tensors`` hold
        them. Blocks until all workers have called it.

        ``restore`` (a checkpoint directory the servers can read) makes each server load its
        shard from there instead (parameters, optimizer state, version), and ``clock`` is the
        step every worker resumes at; ``tensors`` then receive the restored values.

        A worker that joined late (``late``) only declares the model here: the servers run
        already, and it pulls the parameters of the clock where its share starts.

        ``shm``: ``push_pull`` moves the dense chunks of servers on this machine through shared
        memory instead of the socket (``pslm.ps.client.shm``; without compression only), the same
        values at a fraction of the cost. False: everything takes the socket.
        """
        self.consistency = consistency
        self._clipped = optimizer.clip_norm > 0
        self.feedback = ErrorFeedback(get_codec(check_codecs(push_codec, pull_codec)))
        self.pull_codec = pull_codec
        ks = KeySpace.build(
            ((n, t.shape) for n, t in tensors.items()),
            self.num_servers,
            chunk_bytes=chunk_bytes,
            decay_1d=decay_1d,
            rows=rows,
        )
        if rows and consistency.kind == "local":
            raise ConfigError("row tensors need bsp, ssp or asp: local SGD pushes whole tensors")
        self._check_alive()
        self.channel.request(
            "scheduler",
            Message("declare", body={"node": self.me.node_id, "keyspace": ks.to_dict()}),
        )
        self.keyspace = ks
        self._layout = [
            [
                Slot(c.key, t.name, c.offset, c.length, t.row_width if t.rows else 0, i)
                for i, c in enumerate(ks.shard(s))
                for t in [ks.tensors[c.tensor]]
            ]
            for s in range(self.num_servers)
        ]
        if self.late:  # the servers hold the parameters already; pull them at the clock to start
            self._share_memory(shm)
            return
        if self.rank == 0:
            self._check(tensors, "init", full=True)
            body = {
                "worker": 0,
                "keyspace": ks.to_dict(),
                "optimizer": optimizer.to_dict(),
                "consistency": consistency.to_dict(),
                "restore": restore,
                "clock": clock,
            }
            ids = [
                self.channel.send(
                    f"server-{s}",
                    Message(
                        "init",
                        body=body,
                        tensors=[] if restore else self._pack_all(tensors, s),
                    ),
                )
                for s in range(self.num_servers)
            ]
            self.channel.wait(ids)
        self.barrier("pslm.init")
        if self.rank != 0 or restore:
            self.wait(self.pull(tensors, version=0, clock=clock))
        self._share_memory(shm)

    def _share_memory(self, wanted: bool) -> None:
        """Offer shared memory to each server on this machine; one that refuses it (another
        machine after all, another process namespace) stays on the socket."""
        assert self.keyspace is not None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        plain = self.feedback.codec.name == "none" and self.pull_codec == "none"
        if not (wanted and plain and shm_available()):
            return
        local = [s for s, addr in enumerate(self.servers) if on_this_machine(addr)]
        memory = WorkerMemory.create(self.keyspace, local, self.rank) if local else None
        if memory is None:
            return
        for s in memory.servers:
            try:
                self.channel.request(
                    f"server-{s}", Message("attach", body=memory.offer(s, worker=self.rank))
                )
            except ProtocolError as exc:
                log.info("server %d stays on the socket: %s", s, exc)
                memory.drop(s)
        if memory.active:
            self.memory = memory
            log.info("shared memory with the servers on this machine: %s", sorted(memory.active))
        else:
            memory.close()

    def allocate(self, *, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """New zeroed fp32 tensors, one per name given to ``init``, laid out for the wire.

        Tensors that fit one chunk lie back to back in the order of the pieces their server
        expects, so pushing them and pulling into them moves each piece with one copy or none.
        Use them as the storage of parameters and gradients (call after ``init``).
        """
        ks = self.keyspace
        if ks is None:
            raise ClusterError("allocate before init: call init first")
        out: dict[str, torch.Tensor] = {}
        for s in range(self.num_servers):
            slots = self._layout[s]
            for lo, hi in ks.pieces(s):
                run = slots[lo:hi]
                whole = [x for x in run if x.offset == 0 and x.length == self._numel(x.name)]
                if len(whole) != len(run) or len(run) < 2:
                    continue
                buf = torch.zeros(sum(x.length for x in run), pin_memory=pin_memory)
                for x, view in zip(run, buf.split([x.length for x in run]), strict=True):
                    out[x.name] = view.view(ks.tensors[ks.index[x.name]].shape)
        for t in ks.tensors:  # tensors of several chunks, or alone in their piece
            if t.name not in out:
                out[t.name] = torch.zeros(t.shape, pin_memory=pin_memory)
        return {t.name: out[t.name] for t in ks.tensors}

    def _numel(self, name: str) -> int:
        assert self.keyspace is not None
        return self.keyspace.tensors[self.keyspace.index[name]].numel

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

    def save(self, directory: str, version: int) -> list[str]:
        """Have every server write its shard (parameters and optimizer state) into
        ``directory``, which must exist and be reachable by the servers; blocks until all are
        written. Refused unless the servers are at ``version``. Returns the files written."""
        self._check_alive()
        body = {"worker": self.rank, "path": directory, "version": version}
        ids = [
            self.channel.send(f"server-{s}", Message("save", body=body))
            for s in range(self.num_servers)
        ]
        replies = self.channel.wait(ids)
        return [str(replies[i].body.get("file", "")) for i in ids]

    # --- data -------------------------------------------------------------------------------

    def push(
        self,
        grads: Mapping[str, torch.Tensor],
        clock: int,
        *,
        weight: float = 1.0,
        scalars: Mapping[str, float] | None = None,
        rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        share: int | None = None,
    ) -> int:
        """Send gradients for ``clock`` to every server; returns a timestamp for ``wait``.

        Returns without waiting; the gradient tensors must not be modified until ``wait``
        returns. ``weight`` (e.g. this worker's number of samples) weights the mean across
        workers, and the mean of ``scalars`` (e.g. the loss) that ``push_pull`` returns.
        Needs every tensor given to ``init``; for row tensors, ``rows`` as in ``push_pull``.
        ``share``: the part of each global batch these gradients are for (default: this
        worker's rank); under BSP a clock's update waits for every share, whoever pushes it.
        """
        return self._push(grads, clock, weight, scalars, out=None, rows=rows, share=share)

    def pull(
        self, out: Mapping[str, torch.Tensor], *, version: int = 0, clock: int | None = None
    ) -> int:
        """Fetch parameters into ``out``; returns a timestamp.

        Under BSP the reply waits until the servers reach ``version``; under SSP until every
        worker is within the bound of ``clock`` (default: this worker's pushes so far).
        Returns without waiting; ``out`` is filled by ``wait``. ``out`` may hold any subset of
        the tensors given to ``init`` (contiguous, any float dtype and device).
        """
        self._check(out, "pull", full=False)
        ids: dict[int, int] = {}
        expect: dict[int, Expect] = {}
        for s in range(self.num_servers):
            mine = [slot for slot in self._layout[s] if slot.name in out]
            if not mine:
                continue
            everything = len(mine) == len(self._layout[s])
            keys = None if everything else [slot.key for slot in mine]
            body: dict[str, object] = {
                "worker": self.rank,
                "min_version": version,
                "keys": keys,
                "pull_codec": self.pull_codec,
            }
            if clock is not None:
                body["clock"] = clock
            rid = self.channel.send(f"server-{s}", Message("pull", body=body))
            ids[rid] = s
            rows = self._layout[s][self._n_dense(s) :]
            expect[rid] = (
                Expect(pieces=True, runs=[[r] for r in rows])
                if everything
                else Expect(runs=[[m] for m in mine])
            )
        return self._track(_Request(ids, expect, out))

    def push_pull(
        self,
        grads: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        clock: int,
        *,
        weight: float = 1.0,
        scalars: Mapping[str, float] | None = None,
        rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        share: int | None = None,
    ) -> int:
        """``push`` for ``clock``, and get back the parameters after that update, in one
        exchange per server. ``out`` must hold every tensor; it is filled by ``wait``, whose
        result also carries each of ``scalars`` averaged over the workers (weighted).

        ``rows`` gives, for each row tensor, (rows pushed, rows wanted back): only those rows
        of its gradient travel, and only the wanted rows of ``out`` are filled."""
        plan = self._planned(grads, out) if rows is None else None
        if plan is not None:
            return self._push_planned(plan, out, clock, weight, scalars, share)
        self._check(out, "push_pull", full=True)
        return self._push(grads, clock, weight, scalars, out=out, rows=rows, share=share)

    def wait(
        self,
        ts: int,
        timeout: float | None = None,
        *,
        interrupt: Callable[[], bool] | None = None,
    ) -> Completion:
        """Block until request ``ts`` is complete; return what the servers said.

        The values it fetched change in ``out`` all at once, when every server has answered:
        never half of them - except where a server's share is pushed in parts (a planned
        ``push_pull`` of over PART_BYTES of dense chunks to one server): each part's values are
        copied as they arrive, so after an error some may be new; ``push_pull`` the same clock
        again (it is taken once) to have them all. Raises RequestTimeout after ``timeout``
        seconds (default: the client's), RefusedError if a server refused the request, and
        Interrupted when ``interrupt()`` (asked every 0.1 s) says True: then nothing has
        changed yet (but for parts, as above) and ``wait(ts)`` may be called again.
        """
        req = self._requests.pop(ts)
        plan, parts = req.plan, req.parts

        def fill_part(rid: int, reply: Message) -> None:  # (a part: copied as it arrives)
            if plan is not None and rid in parts:
                plan.fill_part(reply, req.ids[rid], parts[rid])

        self._waiting = True
        try:
            replies = self.channel.wait(
                req.ids, timeout, interrupt=interrupt, on_reply=fill_part if parts else None
            )
        except Interrupted:
            self._requests[ts] = req
            raise
        except BaseException:
            self._release(req)
            raise
        finally:
            self._waiting = False
        self._release(req)
        if plan is not None:
            whole = {rid: r for rid, r in replies.items() if rid not in parts}
            received = plan.fill(whole, req.ids)
            in_parts = (r for rid, r in replies.items() if rid in parts)
            received += sum(t.nbytes for r in in_parts for t in r.tensors)
        else:
            received = sum(t.nbytes for r in replies.values() for t in r.tensors)
            if req.out is not None:  # every reply checked before any is copied: all or nothing
                for rid, reply in replies.items():
                    self.scatter(reply, req.ids[rid], req.expect[rid], req.out, check_only=True)
                for rid, reply in replies.items():
                    self.scatter(reply, req.ids[rid], req.expect[rid], req.out)
        for rid, r in replies.items():  # what a server has applied need not be kept
            s, v = req.ids[rid], int(r.body.get("version", 0))
            if s in self._retained:
                self._retained[s] = [(c, m) for c, m in self._retained[s] if c >= v]
        version = min((int(r.body.get("version", 0)) for r in replies.values()), default=0)
        scalars: dict[str, float] = {}
        held = 0.0
        staleness = 0
        by: tuple[int, ...] = ()
        for rid, r in replies.items():
            if isinstance(r.body.get("mode"), dict):  # the servers changed consistency model
                self.consistency = Consistency.from_dict(r.body["mode"])
            staleness = max(staleness, int(r.body.get("staleness", 0)))
            raw = r.body.get("scalars")
            if isinstance(raw, dict):
                scalars.update({str(k): float(v) for k, v in raw.items()})
            held = max(held, float(r.body.get("held_s", 0.0)))
            if r.body.get("shm") and self.memory is not None:
                received += self.memory.nbytes(req.ids[rid])
            if not by and isinstance(r.body.get("by"), list):
                by = tuple(int(w) for w in r.body["by"])
        return Completion(version, scalars, held, req.sent, received, staleness, by)

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Tell the scheduler this worker is done (blocks until every worker is) and disconnect.

        The servers shut down once every worker has closed.
        """
        if self._closed:
            return
        if self.heartbeat.stop_requested.is_set() or self.heartbeat.lost.is_set():
            self._disconnect()  # the cluster is stopping (or gone): nothing to wait for
            return
        try:
            self.channel.request("scheduler", Message("finalize", body={"node": self.me.node_id}))
        finally:
            self._disconnect()

    def _disconnect(self) -> None:
        self._closed = True
        self.heartbeat.close()
        self.channel.close()
        if self.memory is not None:
            self.memory.close()

    def _release(self, req: _Request) -> None:
        """``req`` is over: its servers' shared regions may take the next push."""
        if self.memory is not None:
            self.memory.busy.difference_update(req.shared)

    def __enter__(self) -> PSClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:  # a failed worker does not finalize: the job is not complete
            self._disconnect()

    # --- internals --------------------------------------------------------------------------

    def _push(
        self,
        grads: Mapping[str, torch.Tensor],
        clock: int,
        weight: float,
        scalars: Mapping[str, float] | None,
        out: Mapping[str, torch.Tensor] | None,
        rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        share: int | None = None,
    ) -> int:
        self._check(grads, "push", full=True)
        self.follow_servers()
        if not weight > 0:
            raise ConfigError(f"push weight must be positive, got {weight}")
        wanted = self.row_selection(rows)
        head = self.push_header(clock, weight, reply_params=out is not None, share=share)
        if self.clips_each_push:
            head.sq_norm = sq_norm(grads)
        ids: dict[int, int] = {}
        expect: dict[int, Expect] = {}
        sent = 0
        shared: list[int] = []
        for s in range(self.num_servers):
            mine = replace(head, scalars=scalars_for(s, scalars))
            memory = self.memory
            if out is not None and memory is not None and memory.ready(s):
                sent += memory.stage(s, self._pack(grads, s))
                memory.exchanges += 1
                shared.append(s)
                mine.shm = memory.segment.name
                tensors = []
            else:
                tensors = self._encode_dense(grads, s, head.share)
            row_slots = self._layout[s][self._n_dense(s) :]
            row_tensors, row_expect = self.encode_rows(grads, row_slots, wanted)
            mine.row_keys = [slot.key for slot in row_slots]
            tensors += row_tensors
            sent += sum(t.numel() * t.element_size() for t in tensors)
            msg = Message("push", body=mine.to_body(), tensors=tensors)
            rid = self.channel.send(f"server-{s}", msg)
            if out is None and self.consistency.kind == "bsp":  # acknowledged before applied
                copy = Message("push", body=msg.body, tensors=[t.clone() for t in tensors])
                self._retained.setdefault(s, []).append((clock, copy))
            ids[rid] = s
            expect[rid] = Expect(pieces=True, rows=row_expect, shared=mine.shm is not None)
        if self.memory is not None:
            self.memory.busy.update(shared)
        return self._track(_Request(ids, expect, out, sent, tuple(shared)))

    def _planned(
        self, grads: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]
    ) -> Plan | None:
        """The Plan of a push_pull between ``grads`` and ``out``: the last one while both
        mappings are unchanged (checked in a few microseconds), else checked and made anew.
        None where a plan does not apply: row tensors, codecs, shared memory, pushes that
        carry their own norm, or tensors not laid out as spans (the general path then)."""
        ks = self.keyspace
        plain = self.feedback.codec.name == "none" and self.pull_codec == "none"
        if ks is None or not plain or self.memory is not None or self.clips_each_push:
            return None
        key = signature(grads) + signature(out)
        if self._plan is not None and self._plan.key == key:
            self._check_alive()
            return self._plan
        if key == self._no_plan or ks.row_tensors():
            return None
        self._check(out, "push_pull", full=True)
        self._check(grads, "push", full=True)
        pieces = [ks.pieces(s) for s in range(self.num_servers)]
        self._plan = Plan.make(grads, out, self._layout, pieces)
        if self._plan is None:
            self._no_plan = key
        return self._plan

    def _push_planned(
        self,
        plan: Plan,
        out: Mapping[str, torch.Tensor],
        clock: int,
        weight: float,
        scalars: Mapping[str, float] | None,
        share: int | None,
    ) -> int:
        """``push_pull`` along ``plan``: each server's spans of the gradients as they are."""
        self.follow_servers()
        if not weight > 0:
            raise ConfigError(f"push weight must be positive, got {weight}")
        head = self.push_header(clock, weight, reply_params=True, share=share)
        ids: dict[int, int] = {}
        parts: dict[int, int] = {}
        for s, messages in enumerate(plan.messages):
            mine = scalars_for(s, scalars)
            for i, (part, tensors, wire) in enumerate(messages):
                this = head if part is None else head.with_part(part)
                if part is None or part.final:  # the scalars come with the last part
                    this = replace(this, scalars=mine)
                msg = Message("push", body=this.to_body(), tensors=tensors, wire=wire)
                rid = self.channel.send(f"server-{s}", msg)
                ids[rid] = s
                if part is not None:
                    parts[rid] = i
        return self._track(_Request(ids, {}, out, plan.nbytes, plan=plan, parts=parts))

    def _unshare(self, server: int, msg: Message) -> Message:
        """A request sent again to ``server``'s new address: a push that went through shared
        memory carries its staged gradients after all (the new server may be elsewhere)."""
        if msg.op != "push" or "shm" not in msg.body or self.memory is None:
            return msg
        body = {k: v for k, v in msg.body.items() if k != "shm"}
        staged = [g.clone() for g in self.memory.gradients(server)]
        return Message(msg.op, id=msg.id, body=body, tensors=staged + msg.tensors)

    def push_header(
        self, clock: int, weight: float, *, reply_params: bool, share: int | None = None
    ) -> PushHeader:
        """What every push message of this worker for ``clock`` carries."""
        if share is not None and not 0 <= share < self.num_workers:
            raise ConfigError(f"share must lie in [0, {self.num_workers}), got {share}")
        return PushHeader(
            worker=self.rank,
            share=self.rank if share is None else share,
            clock=clock,
            weight=float(weight),
            reply_params=reply_params,
            codec=self.feedback.codec.name,
            pull_codec=self.pull_codec,
        )

    def row_selection(
        self, rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(rows pushed, rows wanted) of every row tensor, as sorted unique int64 tensors;
        ConfigError if one is missing or out of range."""
        assert self.keyspace is not None
        out = {}
        for t in self.keyspace.row_tensors():
            if rows is None or t.name not in rows:
                raise ConfigError(f"push: row tensor {t.name!r} needs its rows (rows=...)")
            pushed, wanted = (torch.unique(torch.as_tensor(r).long()) for r in rows[t.name])
            for r in (pushed, wanted):
                if r.dim() != 1 or (r.numel() and not 0 <= int(r[0]) <= int(r[-1]) < t.shape[0]):
                    raise ConfigError(f"push: rows of {t.name!r} must lie in [0, {t.shape[0]})")
            out[t.name] = (pushed, wanted)
        if rows and (unknown := set(rows) - set(out)):
            raise ConfigError(f"push: {sorted(unknown)} are not row tensors")
        return out

    def _encode_dense(
        self, grads: Mapping[str, torch.Tensor], server: int, share: int
    ) -> list[torch.Tensor]:
        """All of ``server``'s dense chunks of ``grads`` as a push carries them: in pieces for
        elementwise codecs, else one chunk at a time (``pslm.ps.server.intake``). Lossy codecs keep
        their residual per share and piece (or chunk)."""
        if not self.feedback.codec.elementwise:
            slots = self._layout[server][: self._n_dense(server)]
            return self.encode_runs(grads, [[slot] for slot in slots], share)
        return [
            part
            for i, piece in enumerate(self._pack(grads, server))
            for part in self.feedback.encode(f"{share}/{server}/{i}", piece.reshape(-1))
        ]

    def encode_runs(
        self, grads: Mapping[str, torch.Tensor], runs: Sequence[Sequence[Slot]], share: int
    ) -> list[torch.Tensor]:
        """Runs of dense chunks of ``grads``, a run a tensor, through the push codec."""
        out = []
        for run in runs:
            out += self.feedback.encode(f"{share}/k{run[0].key}", gather(grads, run))
        return out

    def runs_of(self, slots: Sequence[Slot], grads: Mapping[str, torch.Tensor]) -> list[list[Slot]]:
        """``slots`` (one server's, in shard order) in runs that travel as one tensor each
        (``pslm.ps.client.layout.runs_of``; single chunks for codecs that are not elementwise)."""
        if not self.feedback.codec.elementwise:
            return [[slot] for slot in slots]
        return runs_of(slots, grads)

    def encode_rows(
        self,
        grads: Mapping[str, torch.Tensor],
        slots: Sequence[Slot],
        wanted: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[list[torch.Tensor], list[tuple[Slot, torch.Tensor]]]:
        """The tensors of row chunks ``slots`` in a push (rows, values, rows wanted, numbered
        within the chunk), and where the wanted rows go (global rows) when they come back."""
        tensors: list[torch.Tensor] = []
        expect = []
        for slot in slots:
            pushed, want = (slot.rows_in(r) for r in wanted[slot.name])
            first = slot.offset // slot.width
            values = grads[slot.name].reshape(-1, slot.width).index_select(0, pushed)
            # row numbers within the chunk fit int32: half the overhead of int64
            local = (pushed - first).int(), (want - first).int()
            tensors += [local[0], values.float().reshape(-1), local[1]]
            expect.append((slot, want))
        return tensors, expect

    def slots(self, server: int) -> list[Slot]:
        """Where each of ``server``'s chunks lives in the caller's tensors, in shard order."""
        return self._layout[server]

    def check_tensors(self, tensors: Mapping[str, torch.Tensor], what: str, *, full: bool) -> None:
        """ConfigError unless ``tensors`` match what was given to ``init`` (all of them if
        ``full``)."""
        self._check(tensors, what, full=full)

    def _n_dense(self, server: int) -> int:
        assert self.keyspace is not None
        return self.keyspace.dense(server)

    def _track(self, req: _Request) -> int:
        ts = self._next_ts
        self._next_ts += 1
        self._requests[ts] = req
        return ts

    def _pack_all(self, tensors: Mapping[str, torch.Tensor], server: int) -> list[torch.Tensor]:
        """All of ``server``'s chunks of ``tensors``: the dense pieces, then each row chunk."""
        rows = self._layout[server][self._n_dense(server) :]
        return self._pack(tensors, server) + [s.view(tensors) for s in rows]

    def _pack(self, tensors: Mapping[str, torch.Tensor], server: int) -> list[torch.Tensor]:
        """``server``'s dense chunks of ``tensors`` as message pieces (``KeySpace.pieces``): a
        lone chunk is a view, runs of small chunks are copied into one new buffer."""
        assert self.keyspace is not None
        slots = self._layout[server]
        return [gather(tensors, slots[lo:hi]) for lo, hi in self.keyspace.pieces(server)]

    def scatter(
        self,
        reply: Message,
        server: int,
        expect: Expect,
        out: Mapping[str, torch.Tensor],
        *,
        check_only: bool = False,
    ) -> None:
        """Copy a reply into ``out``: its dense pieces, whole chunks, then rows (ProtocolError
        if a tensor has the wrong size; ``check_only``: check, copy nothing)."""
        assert self.keyspace is not None
        pieces = self.keyspace.pieces(server) if expect.pieces else []
        given: list[torch.Tensor] = []
        if reply.body.get("shm"):  # the dense pieces are in the inbox
            if not (expect.shared and expect.pieces and self.memory is not None):
                raise ProtocolError(f"server {server} answered through memory it was not given")
            given = self.memory.inbox(server)
        n = len(pieces) + len(expect.runs) + len(expect.rows)
        if len(given) + len(reply.tensors) != n:
            raise ProtocolError(f"reply has {len(reply.tensors)} tensors, expected {n}")
        tensors = iter(given + reply.tensors)
        layout = self._layout[server]
        # the finite lists first: zip stops on them before taking from the iterator
        for (lo, hi), t in zip(pieces, tensors, strict=False):
            copy_run(t, layout[lo:hi], out, check_only)
        for run, t in zip(expect.runs, tensors, strict=False):
            copy_run(t, run, out, check_only)
        for (slot, rows), t in zip(expect.rows, tensors, strict=False):
            if t.dim() != 1 or t.numel() != len(rows) * slot.width:
                raise ProtocolError(f"reply rows for {slot.name!r} have the wrong size")
            if not check_only:
                dest = out[slot.name].view(-1, slot.width)
                dest.index_copy_(0, rows, t.view(-1, slot.width).to(dest.dtype))

    def _check(self, tensors: Mapping[str, torch.Tensor], what: str, *, full: bool) -> None:
        self._check_alive()
        ks = self.keyspace
        if ks is None and what != "init":
            raise ClusterError(f"{what} before init: call init first")
        if ks is None:
            return
        if full and (missing := [t.name for t in ks.tensors if t.name not in tensors]):
            raise ConfigError(f"{what}: missing tensors {missing[:5]}")
        for name, t in tensors.items():
            if name not in ks.index:
                raise ConfigError(f"{what}: {name!r} is not a tensor given to init")
            spec = ks.tensors[ks.index[name]]
            if tuple(t.shape) != spec.shape:
                raise ConfigError(
                    f"{what}: {name!r} has shape {list(t.shape)}, expected {list(spec.shape)}"
                )
            if t.dtype not in FLOAT_DTYPES:
                raise ConfigError(f"{what}: {name!r} has dtype {t.dtype}; need fp32, fp16 or bf16")
            if what != "pull" and t.device.type != "cpu":
                raise ConfigError(f"{what}: {name!r} is on {t.device}; send CPU tensors")
            if what != "push" and not t.is_contiguous():
                raise ConfigError(f"{what}: {name!r} is not contiguous")

    def _check_alive(self) -> None:
        if self._closed:
            raise ClusterError("this client is closed")
        if self.heartbeat.lost.is_set():
            raise ClusterError(f"lost contact with the scheduler at {self.cfg.scheduler}")
