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
Each sends one message per server per call, carrying all of that server's chunks (encoded by
``pslm.ps.client.encode``). The other calls say whether they block. A shard whose server died
is served by its backup from then on (``pslm.ps.client.failover``); servers on this machine
may take the dense chunks through shared memory (``pslm.ps.client.shm``).

A PSClient is not thread-safe: use it from the thread that made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

from pslm.errors import ClusterError, ConfigError, Interrupted
from pslm.ps.client import encode
from pslm.ps.client.encode import Rows
from pslm.ps.client.failover import Failover
from pslm.ps.client.layout import Expect, Layout, Plan, sq_norm
from pslm.ps.client.member import ClientConfig, ClusterMember
from pslm.ps.client.sending import Planner, Request, send_planned, send_push
from pslm.ps.client.shm import WorkerMemory, share_memory
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import DEFAULT_CHUNK_BYTES, KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.core.push import PushHeader, check_codecs
from pslm.wire.codecs import ErrorFeedback, get_codec
from pslm.wire.message import Message

log = logging.getLogger("pslm.client")

BSP = Consistency()


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


class PSClient(ClusterMember):
    """A worker's connection to a pslm cluster: a member of it (``ClusterMember``: registers
    on creation, blocking until the whole cluster has registered; barriers, leases, live
    settings) that pushes and pulls parameters."""

    def __init__(self, cfg: ClientConfig):
        super().__init__(cfg)
        self.layout: Layout | None = None
        """Where every server's chunks live in the tensors given to ``init``."""
        self.consistency = BSP
        self._clipped = False
        self.feedback = ErrorFeedback(get_codec("none"))
        self.pull_codec = "none"
        self.memory: WorkerMemory | None = None
        """Shared memory with the servers on this machine (``init``'s ``shm``)."""
        self.failover = Failover(
            scheduler=cfg.scheduler, servers=self.me.servers, epoch=self.me.epoch
        )
        self._requests: dict[int, Request] = {}
        self._next_ts = 1
        self._waiting = False  # in wait(): for servers' replies
        self.channel.watch = self.follow_servers
        self.planner = Planner()

    @property
    def keyspace(self) -> KeySpace | None:
        """The key space ``init`` declared (None before)."""
        return self.layout.keyspace if self.layout is not None else None

    @property
    def servers(self) -> list[str]:
        """Where each shard is served now (it moves when a server dies and its backup takes
        over). Cheap; any thread."""
        return self.failover.servers

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
        consistency model. Blocks until all workers have called it.

        ``push_codec`` compresses gradients (none, bf16, fp16, int8, topk:RATIO; lossy ones
        with error feedback kept here), ``pull_codec`` parameters (none, bf16, fp16). The
        tensors named in ``rows`` (e.g. an untied token embedding) are row tensors: pushes
        carry only the rows a step touched and bring back only the rows the next step needs
        (``push_pull``'s ``rows``), and the servers update them with lazy Adam, as
        ``torch.optim.SparseAdam``.

        Every worker calls it with tensors of the same names and shapes, in the same order;
        worker 0's values become the parameters, and on return every worker's ``tensors`` hold
        them. ``restore`` (a checkpoint directory the servers can read) makes each server load
        its shard from there instead (parameters, optimizer state, version), and ``clock`` is
        the step every worker resumes at; ``tensors`` then receive the restored values.

        A worker that joined late (``late``) only declares the model here: the servers run
        already, and it pulls the parameters of the clock where its share starts.

        ``shm``: ``push_pull`` moves the dense chunks of servers on this machine through shared
        memory instead of the socket (``pslm.ps.client.shm``; without compression only), the
        same values at a fraction of the cost. False: everything takes the socket.
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
        self.layout = Layout.of(ks, self.num_servers)
        if self.late:  # the servers hold the parameters already; pull them at the clock to start
            self._share_memory(shm)
            return
        if self.rank == 0:
            self._initialise_servers(tensors, optimizer, consistency, restore, clock)
        self.barrier("pslm.init")
        if self.rank != 0 or restore:
            self.wait(self.pull(tensors, version=0, clock=clock))
        self._share_memory(shm)

    def _initialise_servers(
        self,
        tensors: Mapping[str, torch.Tensor],
        optimizer: OptimizerConfig,
        consistency: Consistency,
        restore: str,
        clock: int,
    ) -> None:
        """Worker 0: every server's shard, with its values (or the checkpoint to restore)."""
        layout = self._layout()
        self._check(tensors, "init", full=True)
        body = {
            "worker": 0,
            "keyspace": layout.keyspace.to_dict(),
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
                    tensors=[] if restore else encode.pack_all(layout, tensors, s),
                ),
            )
            for s in range(self.num_servers)
        ]
        self.channel.wait(ids)

    def _share_memory(self, wanted: bool) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        plain = self.feedback.codec.name == "none" and self.pull_codec == "none"
        if wanted and plain:
            self.memory = share_memory(
                self.channel, self._layout().keyspace, self.servers, self.rank
            )

    def allocate(self, *, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """New zeroed fp32 tensors, one per name given to ``init``, laid out for the wire
        (``pslm.ps.client.encode.allocate``): use them as the storage of parameters and
        gradients, and a push or pull moves each piece with one copy or none. At once."""
        if self.layout is None:
            raise ClusterError("allocate before init: call init first")
        return encode.allocate(self.layout, pin_memory=pin_memory)

    # --- data -------------------------------------------------------------------------------

    def push(
        self,
        grads: Mapping[str, torch.Tensor],
        clock: int,
        *,
        weight: float = 1.0,
        scalars: Mapping[str, float] | None = None,
        rows: Rows | None = None,
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
        layout = self._layout()
        ids: dict[int, int] = {}
        expect: dict[int, Expect] = {}
        for s in range(self.num_servers):
            mine = [slot for slot in layout.slots[s] if slot.name in out]
            if not mine:
                continue
            everything = len(mine) == len(layout.slots[s])
            body: dict[str, object] = {
                "worker": self.rank,
                "min_version": version,
                "keys": None if everything else [slot.key for slot in mine],
                "pull_codec": self.pull_codec,
            }
            if clock is not None:
                body["clock"] = clock
            rid = self.channel.send(f"server-{s}", Message("pull", body=body))
            ids[rid] = s
            expect[rid] = (
                Expect(pieces=True, runs=[[r] for r in layout.rows(s)])
                if everything
                else Expect(runs=[[m] for m in mine])
            )
        return self._track(Request(ids, expect, out))

    def push_pull(
        self,
        grads: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        clock: int,
        *,
        weight: float = 1.0,
        scalars: Mapping[str, float] | None = None,
        rows: Rows | None = None,
        share: int | None = None,
    ) -> int:
        """``push`` for ``clock``, and get back the parameters after that update, in one
        exchange per server; returns a timestamp at once. ``out`` must hold every tensor; it
        is filled by ``wait``, whose result also carries each of ``scalars`` averaged over the
        workers (weighted).

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
        received = self._fill(req, replies)
        for rid, r in replies.items():  # what a server has applied need not be kept
            self.failover.applied(req.ids[rid], int(r.body.get("version", 0)))
            if r.body.get("shm") and self.memory is not None:
                received += self.memory.nbytes(req.ids[rid])
        what = encode.said(replies.values())
        if what.mode is not None:  # the servers changed consistency model
            self.consistency = what.mode
        return Completion(
            what.version, what.scalars, what.held_s, req.sent, received, what.staleness, what.by
        )

    def _fill(self, req: Request, replies: dict[int, Message]) -> int:
        """Copy the replies' values into the request's ``out`` (every reply checked before
        any is copied: all or nothing); returns the tensor bytes they carried."""
        plan, parts = req.plan, req.parts
        if plan is not None:
            whole = {rid: r for rid, r in replies.items() if rid not in parts}
            received = plan.fill(whole, req.ids)
            in_parts = (r for rid, r in replies.items() if rid in parts)
            return received + sum(t.nbytes for r in in_parts for t in r.tensors)
        if req.out is not None:
            layout = self._layout()
            for check_only in (True, False):
                for rid, reply in replies.items():
                    s = req.ids[rid]
                    inbox = self._inbox(reply, s)
                    expect = req.expect[rid]
                    encode.scatter(
                        reply, layout, s, expect, req.out, inbox=inbox, check_only=check_only
                    )
        return sum(t.nbytes for r in replies.values() for t in r.tensors)

    # --- control ----------------------------------------------------------------------------

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

    def follow_servers(self) -> None:
        """Send to a shard's new server (its promoted backup) from now on, and send it again
        every request its old server left unanswered (``pslm.ps.client.failover``). Cheap;
        called while waiting and before sends."""
        if self._waiting and self.heartbeat.stop_requested.is_set():
            raise ClusterError("the cluster is stopping (a shard was lost, or shutdown)")
        self.failover.follow(self.heartbeat, self.channel, self.memory)

    def fence(self, clock: int, consistency: Consistency) -> None:
        """Have every server change to ``consistency`` from ``clock`` on (``pslm ctl set
        consistency``; ``pslm.ps.server.asynchronous``): the replies that let the workers read
        at ``clock`` carry it, and each worker's client takes it then (``consistency``).
        Blocks until every server agreed; RefusedError if one cannot."""
        body = {"worker": self.rank, "clock": clock, "consistency": consistency.to_dict()}
        ids = [
            self.channel.send(f"server-{s}", Message("fence", body=body))
            for s in range(self.num_servers)
        ]
        self.channel.wait(ids)

    def set_clipping(self, on: bool) -> None:
        """Whether the optimizer clips now (``pslm ctl set clip=...`` changed it): SSP/ASP
        pushes then carry their squared norm. At once."""
        self._clipped = on

    def push_header(
        self, clock: int, weight: float, *, reply_params: bool, share: int | None = None
    ) -> PushHeader:
        """What every push message of this worker for ``clock`` carries. At once."""
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

    # --- internals --------------------------------------------------------------------------

    def _push(
        self,
        grads: Mapping[str, torch.Tensor],
        clock: int,
        weight: float,
        scalars: Mapping[str, float] | None,
        out: Mapping[str, torch.Tensor] | None,
        rows: Rows | None = None,
        share: int | None = None,
    ) -> int:
        self._check(grads, "push", full=True)
        self.follow_servers()
        if not weight > 0:
            raise ConfigError(f"push weight must be positive, got {weight}")
        head = self.push_header(clock, weight, reply_params=out is not None, share=share)
        if self.clips_each_push:
            head.sq_norm = sq_norm(grads)
        return self._track(
            send_push(
                self.channel,
                self._layout(),
                self.feedback,
                self.memory,
                self.failover,
                head,
                grads,
                scalars,
                rows,
                out,
                # acknowledged before it is applied: kept until it is
                retain=out is None and self.consistency.kind == "bsp",
            )
        )

    def _planned(
        self, grads: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]
    ) -> Plan | None:
        """The Plan of a push_pull between ``grads`` and ``out`` (``pslm.ps.client.sending``),
        or None where a plan does not apply: row tensors, codecs, shared memory, pushes that
        carry their own norm, or tensors not laid out as spans (the general path then)."""
        layout = self.layout
        plain = self.feedback.codec.name == "none" and self.pull_codec == "none"
        if layout is None or not plain or self.memory is not None or self.clips_each_push:
            return None
        plan, key = self.planner.cached(grads, out)
        if plan is not None:
            self._check_alive()
            return plan
        if self.planner.hopeless(key, layout):
            return None
        self._check(out, "push_pull", full=True)
        self._check(grads, "push", full=True)
        return self.planner.make(key, grads, out, layout)

    def _push_planned(
        self,
        plan: Plan,
        out: Mapping[str, torch.Tensor],
        clock: int,
        weight: float,
        scalars: Mapping[str, float] | None,
        share: int | None,
    ) -> int:
        self.follow_servers()
        if not weight > 0:
            raise ConfigError(f"push weight must be positive, got {weight}")
        head = self.push_header(clock, weight, reply_params=True, share=share)
        return self._track(send_planned(self.channel, plan, head, scalars, out))

    def _disconnect(self) -> None:
        super()._disconnect()
        if self.memory is not None:
            self.memory.close()

    def _layout(self) -> Layout:
        if self.layout is None:
            raise ClusterError("call init first")
        return self.layout

    def _inbox(self, reply: Message, server: int) -> list[torch.Tensor] | None:
        """Where ``server``'s reply left its dense values, if it says it used shared memory
        and this worker shares memory with it."""
        memory = self.memory
        if reply.body.get("shm") and memory is not None and server in memory.offsets:
            return memory.inbox(server)
        return None

    def _track(self, req: Request) -> int:
        ts = self._next_ts
        self._next_ts += 1
        self._requests[ts] = req
        return ts

    def _release(self, req: Request) -> None:
        """``req`` is over: its servers' shared regions may take the next push."""
        if self.memory is not None:
            self.memory.busy.difference_update(req.shared)

    def _check(self, tensors: Mapping[str, torch.Tensor], what: str, *, full: bool) -> None:
        self._check_alive()
        encode.check_tensors(self.keyspace, tensors, what, full=full)
