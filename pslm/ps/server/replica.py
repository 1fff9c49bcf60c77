"""Primary-backup replication of a shard: what the shard's server sends its backup, and how
the backup checks it.

    replication = Replication(shard=0, node_id="server-0", scheduler=channel, ...)
    replication.follow(table.backups[0], state)   # the table names a backup: sync it whole
    if replication.replicate(Update(...), state): ...   # every update, before applying it
    update = read_update(msg, state.store, num_workers=2)   # the backup's side
    mirror(update, state, shard=0)

An update carries the reduced gradient of a clock (or of one push, under SSP/ASP) and the
multiplier the server computed for it (mean, clipping), so the backup runs the same kernels on
the same inputs: its copy stays the server's, bit for bit. ``sync`` carries the whole
``ShardState`` (``pslm.ps.server.state``). Nothing in a message is trusted: keys, shapes and
types are checked against the shard before anything changes. A backup that cannot keep up is
dropped (the scheduler is told, and the shard goes on without a copy); a new one is rebuilt by
``sync``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pslm.errors import ProtocolError, PSLMError, RefusedError, ShardFailed
from pslm.ps.core import protocol
from pslm.ps.core.steering import optimizer_settings
from pslm.ps.server.shard import Grad, RowGrad, ShardStore
from pslm.ps.server.state import ShardState
from pslm.wire.message import Message
from pslm.wire.transport import Channel

log = logging.getLogger("pslm.server")

KINDS = ("bsp", "async", "local", "skip", "async-skip")
SKIPS = ("skip", "async-skip")


@dataclass(kw_only=True, slots=True)
class Update:
    """One update of a shard, as its server is about to apply it."""

    kind: str
    """``bsp`` (a clock's mean gradient), ``async`` (one push, SSP/ASP), ``local`` (the mean
    change of local SGD, added in), or ``skip`` / ``async-skip`` (a clock or a push whose
    gradient was not finite: the version advances, nothing else changes; no tensors)."""
    version: int
    """The shard's version before the update."""
    multiplier: float
    grads: list[Grad]
    step: int
    """The step whose learning rate applies."""
    share: int = 0
    """``async``: the share whose push this is (its clock advances)."""
    scalars: dict[str, float] = field(default_factory=dict)
    by: list[int] = field(default_factory=list)
    sq: float = -1.0
    """This shard's part of the squared global norm for the clock (-1: none computed)."""

    def apply(self, store: ShardStore) -> None:
        store.override(optimizer_settings(self.scalars))  # the live settings its server used
        if self.kind in SKIPS:
            store.skip()
        elif self.kind == "local":
            store.add_delta(self.grads, self.multiplier)
        else:
            store.apply(self.grads, self.multiplier, step=self.step)


def update_message(u: Update) -> Message:
    tensors: list[torch.Tensor] = []
    for g in u.grads:
        tensors += [g.rows, g.values.reshape(-1)] if isinstance(g, RowGrad) else [g]
    body = {
        "kind": u.kind,
        "version": u.version,
        "multiplier": u.multiplier,
        "step": u.step,
        "share": u.share,
        "scalars": u.scalars,
        "by": u.by,
        "sq": u.sq,
    }
    return Message("update", body=body, tensors=tensors)


def read_update(msg: Message, store: ShardStore, num_workers: int) -> Update:
    """The checked ``update`` for ``store``; RefusedError (``not_synced``) unless the store
    is at the update's version."""
    version = protocol.field(msg, "version", int)
    if version != store.version:
        raise RefusedError(
            f"update for version {version}: this backup holds {store.version}", code="not_synced"
        )
    kind = protocol.field(msg, "kind", str)
    share = protocol.field(msg, "share", int, 0)
    if kind not in KINDS or not 0 <= share < num_workers:
        raise ProtocolError(f"update: bad kind {kind!r} or share {share}")
    n_rows = len(store.chunks) - store.n_dense
    if kind in SKIPS:
        n_rows = 0
        if msg.tensors:
            raise ProtocolError(f"update: a {kind} carries no tensors, got {len(msg.tensors)}")
    elif len(msg.tensors) != store.n_dense + 2 * n_rows:
        raise ProtocolError(f"update: {len(msg.tensors)} tensors for this shard")
    grads: list[Grad] = []
    for k in range(store.n_dense if kind not in SKIPS else 0):
        store.check_chunk(msg.tensors[k], k, "update")
        grads.append(msg.tensors[k].float())
    for i in range(n_rows):
        rows, values = msg.tensors[store.n_dense + 2 * i : store.n_dense + 2 * i + 2]
        grads.append(store.row_grad(rows, values, store.n_dense + i))
    multiplier = float(protocol.field(msg, "multiplier", (int, float)))
    if not 0.0 <= multiplier < math.inf:  # nan fails too
        raise ProtocolError(f"update: multiplier must be finite and >= 0, got {multiplier}")
    return Update(
        kind=kind,
        version=version,
        multiplier=multiplier,
        grads=grads,
        step=protocol.field(msg, "step", int),
        share=share,
        scalars=protocol.scalars(protocol.field(msg, "scalars", dict, {})),
        by=protocol.ints(protocol.field(msg, "by", list, [])),
        sq=float(protocol.field(msg, "sq", (int, float), -1.0)),
    )


def mirror(update: Update, state: ShardState, shard: int) -> None:
    """A backup: apply its server's ``update`` to its copy ``state``, as the server did.
    ShardFailed when the store fails part-way: the copy is half one version."""
    try:
        update.apply(state.store)
    except Exception as exc:  # (a bug's way out) the backup leaves and is dropped (its
        # server, failing alike, leaves too: the shard is lost and the job goes back to its
        # checkpoint)
        log.exception("applying update %d failed", update.version)
        raise ShardFailed(
            f"backup of shard {shard}: applying update {update.version} failed "
            f"part-way ({exc!r}); leaving"
        ) from exc
    if update.kind in ("async", "async-skip"):
        state.gate.advance(update.share)
        state.skipped += update.kind == "async-skip"
    else:
        state.scalars, state.by = update.scalars, update.by
        if not update.sq < 0:  # (-1: none; nan and inf are a norm every server must share)
            state.norms = {update.version: update.sq}


class BackupLink:
    """A server's connection to its shard's backup: one request at a time, answered or not."""

    def __init__(self, address: str, *, timeout: float, gone: Callable[[], bool]):
        self.address = address
        self.gone = gone
        self.channel = Channel(timeout=timeout, role="server")
        self.channel.connect("backup", address)

    def request(self, msg: Message) -> Any:
        """Send ``msg`` and wait for the backup's answer: RefusedError if it refuses,
        RequestTimeout if it does not answer in time, Interrupted once ``gone()`` (the
        scheduler declared it dead)."""
        rid = self.channel.send("backup", msg)
        return self.channel.wait([rid], interrupt=self.gone)[rid]

    def close(self) -> None:
        self.channel.close()


class Link(Protocol):
    """A connection requests go out on, one at a time (``BackupLink``)."""

    def request(self, msg: Message) -> Any: ...
    def close(self) -> None: ...


class SchedulerLink(Protocol):
    """The scheduler, as a server reaches it (a ``Channel`` with the peer ``scheduler``)."""

    def request(self, name: str, msg: Message) -> Message: ...


class Replication:
    """A shard's server's side of its backup: the link, (re)building the copy, and telling the
    scheduler whether a whole copy exists (only such a backup is promoted).

    ``serving`` turns False when the scheduler answers a report saying another server serves
    the shard now (this one was cut off and thought dead): the server must then leave.
    """

    def __init__(
        self,
        *,
        shard: int,
        node_id: str,
        scheduler: SchedulerLink,
        timeout: float,
        retry_after: float,
        backups: Callable[[], tuple[str, ...] | None],
    ):
        self.shard = shard
        self.node_id = node_id
        self.scheduler = scheduler
        self.timeout = timeout
        """How long the backup may take to confirm (a backup that cannot keep up is dropped,
        not waited for)."""
        self.retry_after = retry_after
        """Seconds before a backup dropped for not keeping up is connected again."""
        self.backups = backups
        """Where the newest shard table (from the heartbeats) says each shard's backup is."""
        self.link: Link | None = None
        self.address = ""
        """The backup the shard table names ("" for none)."""
        self.retry_at = 0.0
        self.serving = True

    def follow(self, address: str, state: ShardState | None) -> None:
        """The shard table names ``address`` as the backup ("": none): connect to it and send
        it the shard (if there is one yet)."""
        if address == self.address:
            return
        self.drop()
        self.address = address
        if address:
            self.connect(state)

    def retry(self, state: ShardState | None) -> None:
        """Connect again to the backup the table names, if it was dropped a while ago for not
        keeping up."""
        if self.link is None and self.address and time.monotonic() > self.retry_at:
            self.connect(state)

    def connect(self, state: ShardState | None) -> None:
        address = self.address

        def gone() -> bool:  # the scheduler declared it dead: do not wait for it any longer
            backups = self.backups()
            return backups is not None and backups[self.shard] != address

        self.link = BackupLink(address, timeout=self.timeout, gone=gone)
        log.info("shard %d's backup is %s", self.shard, address)
        if state is not None:
            self.sync(state)

    def drop(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
            self.retry_at = time.monotonic() + self.retry_after

    def sync(self, state: ShardState) -> None:
        """Send the backup the whole shard (if there is a backup)."""
        if self.link is None:
            return
        try:
            self.link.request(state.to_message(self.shard))
        except PSLMError as exc:
            log.error("could not copy shard %d to its backup: %s", self.shard, exc)
            self.drop()
            self.report("lost")
            return
        log.info("shard %d (version %d) copied to its backup", self.shard, state.store.version)
        self.report("ready")

    def replicate(self, update: Update, state: ShardState) -> bool:
        """Have the backup take ``update`` before it is applied; return once it confirmed, or
        was dropped for not doing so in time (the shard goes on without a copy). False if the
        update must not be applied: another server serves the shard now."""
        if self.link is None:
            return True
        for attempt in (1, 2):
            try:
                self.link.request(update_message(update))
                return True
            except RefusedError as exc:
                if attempt == 2 or exc.code != "not_synced":
                    log.error("shard %d's backup refused an update: %s", self.shard, exc)
                    break
                self.sync(state)  # then the update again
                if self.link is None or not self.serving:
                    return self.serving
            except PSLMError as exc:
                log.error("shard %d's backup did not confirm an update: %s", self.shard, exc)
                break
        self.drop()
        return self.report("lost")

    def report(self, state: str) -> bool:
        """Tell the scheduler this shard's backup is ``ready`` (a whole copy: it may be
        promoted) or ``lost``; returns whether this server still serves the shard (if not, it
        leaves: another took over while it was cut off)."""
        body = {"node": self.node_id, "shard": self.shard, "state": state, "address": self.address}
        try:
            reply = self.scheduler.request("scheduler", Message("backup", body=body))
        except PSLMError as exc:
            log.warning("could not tell the scheduler the backup is %s: %s", state, exc)
            return True
        if not reply.body.get("serving", True):
            log.error("shard %d is served by another server now; leaving", self.shard)
            self.serving = False
        return self.serving

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
