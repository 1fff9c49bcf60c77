"""Push and pull through shared memory when a worker and a server share a machine.

    mine = WorkerMemory.create(keyspace, servers=[0, 1], rank=0)   # the worker's segment
    msg = Message("attach", body=mine.offer(0, worker=0))          # sent to server 0
    mine.stage(0, pieces)          # a push_pull's dense gradients for server 0, into the segment
    mine.inbox(0)                  # after the reply: server 0's new values, as pieces

    paths = SharedPaths()                                          # the server's side
    paths.attach(msg, worker, store)         # map the worker's segment (RefusedError if it is off)
    tensors = paths.push(head, msg.tensors, store)   # a push's dense pieces from the segment
    tensors, shm = paths.reply(msg, store, tensors)   # write the values there, send the rest

A worker's segment holds, for each server on its machine, a gradient region and an inbox, each
as long as the server's dense chunks (in shard order, the layout of ``KeySpace.pieces``). A
``push_pull`` marked ``shm`` (with the segment's name) carries only its row chunks and scalars;
the server reads the dense gradients from the worker's region, applies the update as for any
push, then copies its dense values into the worker's inbox and answers with a reply marked
``shm``. The worker copies them out of the inbox once every server has answered (all or
nothing, as on the socket). A reply to a request whose segment is no longer the worker's (it
died and another took its rank) carries the values itself.

Safe without locks: a worker waits for its ``push_pull`` before it writes the region again, a
server writes an inbox only while that worker waits, and one ``shm`` request per server is in
flight at a time. Only dense fp32 chunks without compression go this way; everything else, and
a shard whose server moved (failover), takes the socket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pslm.errors import ProtocolError, RefusedError
from pslm.ps import protocol
from pslm.ps.keyspace import KeySpace
from pslm.ps.push import PushHeader
from pslm.ps.shard import ShardStore
from pslm.wire.message import Message
from pslm.wire.shm import Segment, attach


def _dense_sizes(keyspace: KeySpace, server: int) -> list[int]:
    """The element count of each of ``server``'s dense pieces."""
    lengths = [c.length for c in keyspace.shard(server)]
    return [sum(lengths[lo:hi]) for lo, hi in keyspace.pieces(server)]


@dataclass(slots=True)
class WorkerMemory:
    """A worker's shared segment: per server on its machine, a gradient region and an inbox."""

    segment: Segment
    offsets: dict[int, int]
    """Server -> where its gradient region starts; its inbox follows it."""
    sizes: dict[int, list[int]]
    """Server -> its dense pieces' sizes."""
    active: set[int] = field(default_factory=set)
    """Servers that take pushes through the segment."""
    busy: set[int] = field(default_factory=set)
    """Servers with an ``shm`` request in flight."""
    exchanges: int = 0
    """Requests sent through the segment so far (one per server and push_pull)."""
    _regions: dict[tuple[int, bool], list[torch.Tensor]] = field(default_factory=dict)
    """(server, inbox) -> the region's pieces: views of the segment, made once."""

    @classmethod
    def create(cls, keyspace: KeySpace, servers: Sequence[int], rank: int) -> WorkerMemory | None:
        """A segment for ``servers`` (those with dense chunks), or None if none has any."""
        sizes = {s: _dense_sizes(keyspace, s) for s in servers}
        sizes = {s: v for s, v in sizes.items() if sum(v)}
        if not sizes:
            return None
        offsets, at = {}, 0
        for s, v in sizes.items():
            offsets[s] = at
            at += 2 * sum(v)
        memory = cls(Segment.create(at, tag=f"w{rank}"), offsets, sizes, set(offsets))
        for s, v in sizes.items():
            n = sum(v)
            for inbox in (False, True):
                start = offsets[s] + (n if inbox else 0)
                memory._regions[s, inbox] = list(memory.segment.tensor[start : start + n].split(v))
        return memory

    @property
    def servers(self) -> list[int]:
        """The servers the segment has regions for."""
        return list(self.offsets)

    def offer(self, server: int, *, worker: int) -> dict[str, Any]:
        """The body of the ``attach`` request for ``server``."""
        n = sum(self.sizes[server])
        at = self.offsets[server]
        return {"worker": worker, "segment": self.segment.describe(), "grad": at, "inbox": at + n}

    def stage(self, server: int, pieces: Sequence[torch.Tensor]) -> int:
        """Copy a push's dense pieces for ``server`` into its gradient region; their bytes."""
        for dest, piece in zip(self._regions[server, False], pieces, strict=True):
            dest.copy_(piece.reshape(-1))
        return self.nbytes(server)

    def nbytes(self, server: int) -> int:
        """Bytes of one of ``server``'s regions (what a push or reply moves through it)."""
        return sum(self.sizes[server]) * 4

    def gradients(self, server: int) -> list[torch.Tensor]:
        """The pieces staged for ``server`` (to send them on the socket after all)."""
        return self._regions[server, False]

    def inbox(self, server: int) -> list[torch.Tensor]:
        """``server``'s reply: its dense values, as pieces."""
        return self._regions[server, True]

    def ready(self, server: int) -> bool:
        """Whether a push to ``server`` may go through the segment now."""
        return server in self.active and server not in self.busy

    def drop(self, server: int) -> None:
        """``server`` takes the socket from now on (its shard moved, or it refused)."""
        self.active.discard(server)

    def close(self) -> None:
        self.segment.close()


@dataclass(slots=True)
class _Mapped:
    name: str
    grad: list[torch.Tensor]
    inbox: torch.Tensor


class SharedPaths:
    """A server's view of the segments of the workers on its machine."""

    def __init__(self) -> None:
        self.by_worker: dict[int, _Mapped] = {}

    def attach(self, msg: Message, worker: int, store: ShardStore) -> Message:
        """Map the segment an ``attach`` request describes; refused unless its regions fit."""
        desc = protocol.field(msg, "segment", dict)
        grad = protocol.field(msg, "grad", int)
        inbox = protocol.field(msg, "inbox", int)
        sizes = _dense_sizes(store.keyspace, store.server)
        n = sum(sizes)
        numel = desc.get("numel")
        if not n:
            raise RefusedError("attach: this server holds no dense chunks", code="no_shm")
        if not isinstance(numel, int) or not all(
            0 <= at and at + n <= numel for at in (grad, inbox)
        ):
            raise RefusedError("attach: the regions do not fit the segment", code="no_shm")
        if grad < inbox < grad + n or inbox < grad < inbox + n:
            raise RefusedError("attach: the regions overlap", code="no_shm")
        try:
            memory = attach(desc, min_numel=n)
        except ProtocolError as exc:
            raise RefusedError(f"attach: {exc}", code="no_shm") from None
        self.by_worker[worker] = _Mapped(
            str(desc["name"]), list(memory[grad : grad + n].split(sizes)), memory[inbox : inbox + n]
        )
        return msg.reply()

    def push(
        self, head: PushHeader, tensors: list[torch.Tensor], store: ShardStore
    ) -> list[torch.Tensor]:
        """The tensors of a push: with its dense pieces read from the worker's segment first,
        if its header names one (``shm``)."""
        if head.shm is None:
            return tensors
        mapped = self.by_worker.get(head.worker)
        if mapped is None or mapped.name != head.shm:
            raise RefusedError(
                f"push: worker {head.worker} has no shared memory on this server", code="no_shm"
            )
        if head.keys is not None:
            raise RefusedError("push: shm carries all dense chunks, without keys", code="no_shm")
        if head.codec != "none":
            raise RefusedError("push: shm carries fp32 gradients only", code="no_shm")
        if head.pull_codec != "none":
            raise RefusedError("push: shm replies carry fp32 values only", code="no_shm")
        return mapped.grad + tensors

    def reply(
        self, msg: Message, store: ShardStore, tensors: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], bool]:
        """For a reply with ``tensors`` (dense pieces first) to ``msg``: the tensors left to
        send, and whether the dense values went to the worker's inbox instead."""
        if "shm" not in msg.body:  # reads and pulls carry no worker field
            return tensors, False
        mapped = self._mapped(msg, protocol.field(msg, "worker", int))
        if mapped is None:  # a worker that died and was replaced since
            return tensors, False
        n_pieces = len(store.keyspace.pieces(store.server))
        mapped.inbox.copy_(store.params[: mapped.inbox.numel()])
        return tensors[n_pieces:], True

    def _mapped(self, msg: Message, worker: int) -> _Mapped | None:
        """The segment a message marked ``shm`` names, if ``worker`` attached it."""
        name = msg.body.get("shm")
        mapped = self.by_worker.get(worker)
        return mapped if name is not None and mapped is not None and mapped.name == name else None
