"""Primary-backup replication of a shard: what the shard's server sends its backup, and how
the backup checks it.

    link = BackupLink(address, timeout=30.0, gone=lambda: False)   # the server's side
    link.request(sync_message(store, Snapshot(...)))              # the whole shard, once
    link.request(update_message(Update(...)))                      # every update, before applying
    snapshot = read_sync(msg, shard=0, num_workers=2)              # the backup's side
    update = read_update(msg, snapshot.store, num_workers=2)
    update.apply(snapshot.store)

An update carries the reduced gradient of a clock (or of one push, under SSP/ASP) and the
multiplier the server computed for it (mean, clipping), so the backup runs the same kernels on
the same inputs: its copy stays the server's, bit for bit. ``sync`` carries the parameters,
optimizer state and step counters, and what a server needs to go on where this one stopped:
the version, every worker's clock, the last clock's scalars and pushers, this shard's recent
parts of the squared norm. Nothing in a message is trusted: keys, shapes and types are checked
against the shard before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pslm.errors import ProtocolError, RefusedError
from pslm.ps.core import protocol
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.core.steering import optimizer_settings
from pslm.ps.server.shard import Grad, RowGrad, ShardStore
from pslm.wire.message import Message
from pslm.wire.transport import Channel

KINDS = ("bsp", "async", "local")


@dataclass(kw_only=True, slots=True)
class Update:
    """One update of a shard, as its server is about to apply it."""

    kind: str
    """``bsp`` (a clock's mean gradient), ``async`` (one push, SSP/ASP) or ``local`` (the mean
    change of local SGD, added in)."""
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
        if self.kind == "local":
            store.add_delta(self.grads, self.multiplier)
        else:
            store.apply(self.grads, self.multiplier, step=self.step)


@dataclass(kw_only=True, slots=True)
class Snapshot:
    """A whole shard and where its server stood."""

    store: ShardStore
    consistency: Consistency
    clocks: list[int]
    """Every worker's clock (SSP/ASP: pushes taken per share)."""
    scalars: dict[str, float] = field(default_factory=dict)
    by: list[int] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)
    """Clock -> this shard's part of the squared norm."""


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
    if len(msg.tensors) != store.n_dense + 2 * n_rows:
        raise ProtocolError(f"update: {len(msg.tensors)} tensors for this shard")
    grads: list[Grad] = []
    for k in range(store.n_dense):
        store.check_chunk(msg.tensors[k], k, "update")
        grads.append(msg.tensors[k].float())
    for i in range(n_rows):
        rows, values = msg.tensors[store.n_dense + 2 * i : store.n_dense + 2 * i + 2]
        grads.append(store.row_grad(rows, values, store.n_dense + i))
    return Update(
        kind=kind,
        version=version,
        multiplier=float(protocol.field(msg, "multiplier", (int, float))),
        grads=grads,
        step=protocol.field(msg, "step", int),
        share=share,
        scalars=protocol.scalars(protocol.field(msg, "scalars", dict, {})),
        by=protocol.ints(protocol.field(msg, "by", list, [])),
        sq=float(protocol.field(msg, "sq", (int, float), -1.0)),
    )


def sync_message(shard: int, snap: Snapshot) -> Message:
    """The whole shard (copies: the live buffers go on changing while it travels)."""
    state = snap.store.state_tensors()
    body = {
        "shard": shard,
        "keyspace": snap.store.keyspace.to_dict(),
        "optimizer": snap.store.base_optimizer.to_dict(),  # live settings come with updates
        "consistency": snap.consistency.to_dict(),
        "version": snap.store.version,
        "clocks": list(snap.clocks),
        "scalars": snap.scalars,
        "by": snap.by,
        "norms": {str(c): sq for c, sq in snap.norms.items()},
        "names": list(state),
    }
    return Message("sync", body=body, tensors=[t.clone() for t in state.values()])


def read_sync(msg: Message, shard: int, num_workers: int) -> Snapshot:
    """A new store holding the shard a ``sync`` carries, checked whole first."""
    if protocol.field(msg, "shard", int) != shard:
        raise RefusedError(f"this server is the backup of shard {shard}")
    store = ShardStore(
        KeySpace.from_dict(protocol.field(msg, "keyspace", dict)),
        shard,
        OptimizerConfig.from_dict(protocol.field(msg, "optimizer", dict)),
    )
    clocks = protocol.ints(protocol.field(msg, "clocks", list))
    names = protocol.field(msg, "names", list)
    if len(clocks) != num_workers or any(c < 0 for c in clocks):
        raise ProtocolError(f"sync: clocks must be {num_workers} clocks >= 0")
    if len(names) != len(msg.tensors) or not all(isinstance(n, str) for n in names):
        raise ProtocolError("sync: one name per tensor")
    tensors = dict(zip(names, msg.tensors, strict=True))
    store.load_state(tensors, protocol.field(msg, "version", int), "sync")
    norms = protocol.field(msg, "norms", dict, {})
    return Snapshot(
        store=store,
        consistency=Consistency.from_dict(protocol.field(msg, "consistency", dict)),
        clocks=clocks,
        scalars=protocol.scalars(protocol.field(msg, "scalars", dict, {})),
        by=protocol.ints(protocol.field(msg, "by", list, [])),
        norms={int(c): float(v) for c, v in norms.items() if str(c).isdigit()},
    )


class BackupLink:
    """A server's connection to its shard's backup: one request at a time, answered or not."""

    def __init__(self, address: str, *, timeout: float, gone: Callable[[], bool]):
        self.address = address
        self.gone = gone
        self.channel = Channel(timeout=timeout)
        self.channel.connect("backup", address)

    def request(self, msg: Message) -> Any:
        """Send ``msg`` and wait for the backup's answer: RefusedError if it refuses,
        RequestTimeout if it does not answer in time, Interrupted once ``gone()`` (the
        scheduler declared it dead)."""
        rid = self.channel.send("backup", msg)
        return self.channel.wait([rid], interrupt=self.gone)[rid]

    def close(self) -> None:
        self.channel.close()
