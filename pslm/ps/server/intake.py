"""Push intake: what a push message carries, checked and decoded, and whether it is new.

    head = PushHeader.decode(msg, num_workers)      # ProtocolError if a field is malformed
    part = decode_part(head, msg.tensors, store)    # RefusedError if the tensors are
    decision = intake.take(head, part, Due(...), store)   # Taken, Replayed or Refused
    if isinstance(decision, Taken) and decision.complete: ...  # every chunk and the final part

Exactly once: a message of a push the server has taken already - a client retrying after a
timeout, a replay, or the new holder of a dead worker's share pushing what that worker had
pushed whole - is ``Replayed``: answered as the first was, never taken twice. ``Intake`` only
decides (and keeps the pushes whose parts are still arriving); the server carries it out.

A worker's push for one clock reaches a server as one message, or as several parts when it
overlaps pushing with backward (``pslm.ps.client.exchange``): each part carries some chunks,
the last one says ``final``. The server applies the push once every chunk has arrived. A part
that asks for parameters back (``reply_params``) is answered after the update with the same chunks,
replies going out in increasing ``priority`` (the order the next forward pass needs them).

Tensors of a push, in order:
- dense chunks: without ``keys``, all of the server's dense chunks, as pieces
  (``KeySpace.pieces``) for elementwise codecs (none, bf16, fp16) and as one chunk at a time
  for the others (int8, top-k: their scale or selection is per chunk); with ``keys``, those
  chunks in runs: ``runs`` gives how many consecutive keys each tensor carries (default: one
  each), and the chunks of a run lie at consecutive positions of the server's shard, so that
  a run is one tensor each way (elementwise codecs only). Each chunk, run or piece takes
  ``codec.parts`` tensors.
- then for every key in ``row_keys`` (row tensors): the rows pushed (int32 or int64, sorted,
  unique, numbered within the chunk), their gradients (fp32, rows x width, flat) and the rows
  wanted back after the update (int32 or int64, sorted, unique).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pslm.errors import ProtocolError, PSLMError, RefusedError
from pslm.ps.core.push import PushHeader
from pslm.ps.core.steering import IN_FORCE
from pslm.ps.server.replies import Reply, Selection
from pslm.ps.server.shard import Grad, ShardStore
from pslm.wire.codecs import Codec, get_codec
from pslm.wire.message import Message

ROW_TENSORS = 3
"""Tensors per row chunk in a push: rows, values, rows wanted back."""


@dataclass(slots=True)
class Part:
    """One push message, decoded: per-chunk gradients by shard position."""

    positions: list[int]
    grads: list[Grad]
    reply: Selection
    """What a reply with parameters would carry: the same chunks, and the wanted rows."""
    final: bool
    priority: int
    sq_norm: float | None
    """The worker's squared gradient norm (SSP/ASP with clipping; final parts)."""


def decode_part(head: PushHeader, t: list[torch.Tensor], store: ShardStore) -> Part:
    """Check and decode the tensors ``t`` of a push message with header ``head``; nothing is
    copied that need not be."""
    keys = head.keys
    codec = get_codec(head.codec)
    dense_pos = list(range(store.n_dense)) if keys is None else _positions(keys, store, dense=True)
    row_pos = _positions(head.row_keys, store, dense=False)
    whole = keys is None and codec.elementwise
    # what each group of codec.parts tensors carries: pieces, or runs of chunks
    spans = [(p, p + 1) for p in dense_pos] if keys is None else _spans(head, dense_pos, codec)
    n_units = len(store.keyspace.pieces(store.server)) if whole else len(spans)
    n_dense = n_units * codec.parts
    if len(t) != n_dense + ROW_TENSORS * len(row_pos):
        raise RefusedError(
            f"push has {len(t)} tensors; {n_units} "
            f"{'pieces' if whole else 'chunks'} in {codec.name} and {len(row_pos)} row chunks "
            f"take {n_dense + ROW_TENSORS * len(row_pos)}",
            code="bad_shape",
        )
    n = codec.parts
    if whole:
        sizes = [x.numel() for x in store.packed[:n_units]]
        pieces = (
            t[:n_dense]  # checked by unpack
            if codec.lossless
            else [codec.decode(t[i * n : (i + 1) * n], size) for i, size in enumerate(sizes)]
        )
        grads: list[Grad] = list(store.unpack(pieces, "push"))
    else:
        grads = []
        for i, (lo, hi) in enumerate(spans):
            part = t[i * n : (i + 1) * n]
            length = store.starts[hi] - store.starts[lo]
            g = part[0] if codec.lossless else codec.decode(part, length)
            store.check_chunk(g, lo, "push", length=length, tensor=i)
            grads.extend(g.split(store.lengths[lo:hi]) if hi - lo > 1 else [g])
    reply = Selection(pieces=keys is None, spans=[] if keys is None else spans)
    for j, pos in enumerate(row_pos):
        rows, values, want = t[n_dense + ROW_TENSORS * j : n_dense + ROW_TENSORS * (j + 1)]
        grads.append(store.row_grad(rows, values, pos))
        reply.rows.append((pos, store.check_rows(want, pos, "push")))
    return Part(dense_pos + row_pos, grads, reply, head.final, head.priority, head.sq_norm)


def _spans(head: PushHeader, positions: list[int], codec: Codec) -> list[tuple[int, int]]:
    """The runs of a keyed part as [lo, hi) shard positions; refused unless each run's chunks
    are consecutive (and runs longer than one chunk go with an elementwise codec)."""
    runs = head.runs
    if runs is None:
        return [(p, p + 1) for p in positions]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in runs) or sum(
        runs
    ) != len(positions):
        raise RefusedError(
            "push: runs must be positive counts adding up to the keys", code="bad_key"
        )
    if not codec.elementwise and len(runs) != len(positions):
        raise RefusedError("push: chunk codecs take one chunk a tensor", code="bad_key")
    spans, i = [], 0
    for r in runs:
        run = positions[i : i + r]
        if run != list(range(run[0], run[0] + r)):
            raise RefusedError("push: a run's chunks must be consecutive", code="bad_key")
        spans.append((run[0], run[0] + r))
        i += r
    return spans


def _positions(keys: list[Any], store: ShardStore, *, dense: bool) -> list[int]:
    """Shard positions of ``keys``; refused unless unique keys of this server's dense (or row)
    chunks."""
    if len(keys) > len(store.chunks) or len(set(map(repr, keys))) != len(keys):
        raise RefusedError("push: keys must be unique keys of this server", code="bad_key")
    out = []
    for k in keys:
        pos = store.position.get(k) if isinstance(k, int) and not isinstance(k, bool) else None
        if pos is None or (pos < store.n_dense) != dense:
            kind = "dense" if dense else "row"
            raise RefusedError(
                f"push: key {k!r} is not a {kind} chunk of this server", code="bad_key"
            )
        out.append(pos)
    return out


@dataclass(slots=True)
class PendingPush:
    """One worker's push for one clock while its parts arrive."""

    clock: int
    weight: float
    worker: int
    """Who sends the parts: the share's holder (a part from another worker means this one
    died and its share went to that one, which pushes the share anew)."""
    grads: list[Grad | None]
    missing: int
    scalars: dict[str, float] = field(default_factory=dict)
    sq_norm: float | None = None
    replies: list[Reply] = field(default_factory=list)
    acks: list[tuple[bytes, Message]] = field(default_factory=list)
    """(peer, part) of parts without ``reply_params`` acknowledged once the push is applied
    (SSP/ASP, where the worker keeps no copy to send again: on the backup too)."""
    seqs: set[int] = field(default_factory=set)
    """The ``seq`` of every part taken (a part sent again is recognised by it)."""

    @classmethod
    def start(cls, clock: int, weight: float, store: ShardStore, worker: int) -> PendingPush:
        n = len(store.chunks)
        return cls(clock, weight, worker, [None] * n, n)

    def problem(self, part: Part) -> RefusedError | None:
        """Why ``part`` cannot be taken: it repeats a chunk, or it is final and leaves chunks
        missing; None if it can."""
        if any(self.grads[p] is not None for p in part.positions):
            return RefusedError(
                f"push for clock {self.clock} repeats chunks already pushed", code="duplicate"
            )
        if part.final and self.missing > len(part.positions):
            return RefusedError(
                f"the final part of the push for clock {self.clock} leaves "
                f"{self.missing - len(part.positions)} chunks missing",
                code="bad_shape",
            )
        return None

    def add(self, part: Part, scalars: dict[str, float]) -> None:
        for p, g in zip(part.positions, part.grads, strict=True):
            self.grads[p] = g
        self.missing -= len(part.positions)
        self.scalars.update(scalars)
        if part.sq_norm is not None:
            self.sq_norm = part.sq_norm

    @property
    def complete_grads(self) -> list[Grad]:
        assert self.missing == 0 and all(g is not None for g in self.grads)
        return self.grads  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Due:
    """Where one share's pushes stand on this server (what ``Intake.take`` decides on)."""

    clock: int
    """The clock the share's push is due for: BSP the version, SSP/ASP the share's clock."""
    version: int
    asynchronous: bool
    in_round: bool = False
    """BSP: the share's push for the version is complete and waits for the others."""
    needs_norm: bool = False
    """SSP/ASP with clipping: a push must carry its squared norm."""


@dataclass(slots=True)
class Taken:
    """The message is new and taken into ``pending``; ``complete``: the push is whole now."""

    pending: PendingPush
    complete: bool
    superseded: PendingPush | None = None
    """A dead worker's push of the same share, dropped: what waits for it is refused."""


@dataclass(slots=True)
class Replayed:
    """The message repeats one taken already: answer it as the first was, take nothing."""

    where: str
    """``applied`` (its update is done), ``round`` (BSP: its push waits for the others) or
    ``pending`` (its push waits for more parts: ``pending``)."""
    pending: PendingPush | None = None


@dataclass(slots=True)
class Refused:
    """The message cannot be taken: ``error`` says why (nothing was taken)."""

    error: PSLMError
    superseded: PendingPush | None = None


class Intake:
    """Which push messages are new, and the pushes whose parts are still arriving."""

    def __init__(self) -> None:
        self.incoming: dict[int, PendingPush] = {}
        """Share -> its push while parts arrive."""

    def take(
        self, head: PushHeader, part: Part, due: Due, store: ShardStore
    ) -> Taken | Replayed | Refused:
        """Decide on one push message (of share ``head.share``) and, if it is new, take it."""
        seen = self._replayed(head, due)
        if seen is not None:
            return seen
        wrong = self._wrong_clock(head, due)
        if wrong is not None:
            return Refused(wrong)
        share = head.share
        pending = self.incoming.get(share)
        superseded = None
        if pending is not None and pending.worker != head.worker:
            superseded, pending = self.incoming.pop(share), None
        pending = pending or PendingPush.start(head.clock, head.weight, store, head.worker)
        problem: PSLMError | None = pending.problem(part)
        if problem is None and part.final and due.needs_norm and IN_FORCE not in head.scalars:
            # (a push's own live settings say whether it is clipped)
            if pending.sq_norm is None and part.sq_norm is None:
                problem = ProtocolError("push: sq_norm is needed with clipping under SSP/ASP")
        if problem is not None:
            return Refused(problem, superseded)
        pending.add(part, head.scalars)
        pending.seqs.add(head.seq)
        if part.final:
            self.incoming.pop(share, None)
        else:
            self.incoming[share] = pending
        return Taken(pending, part.final, superseded)

    def _replayed(self, head: PushHeader, due: Due) -> Replayed | Refused | None:
        """A message of a push taken already, or None if new (a part is the same only from
        the same worker: the new holder's parts are its own)."""
        clock = head.clock
        if clock < due.clock:  # applied already
            stale = head.reply_params and not due.asynchronous and clock != due.version - 1
            if stale:  # the values after its update are gone
                return Refused(
                    RefusedError(
                        f"push of share {head.share} for clock {clock} was applied long ago; "
                        f"the server is at version {due.version}",
                        code="stale",
                    )
                )
            return Replayed("applied")
        if not due.asynchronous and due.in_round:
            return Replayed("round") if clock == due.version else None
        pending = self.incoming.get(head.share)
        if pending is not None and (pending.clock, pending.worker) == (clock, head.worker):
            return Replayed("pending", pending) if head.seq in pending.seqs else None
        return None

    @staticmethod
    def _wrong_clock(head: PushHeader, due: Due) -> RefusedError | None:
        """Why a push for any clock but the one its share's push is due for is refused."""
        share, clock = head.share, head.clock
        if due.asynchronous:
            if clock == due.clock:
                return None
            return RefusedError(
                f"push of share {share} for clock {clock}: expected clock {due.clock}",
                code="duplicate" if clock < due.clock else "bad_clock",
            )
        if clock != due.version:
            when = "after the server applied it" if clock < due.version else "too early"
            return RefusedError(
                f"push of share {share} for clock {clock} arrived {when}; "
                f"the server is at version {due.version}",
                code="bad_clock",
            )
        if due.in_round:
            return RefusedError(f"share {share} was pushed for clock {clock}", code="duplicate")
        return None
