"""What a push message carries, checked and decoded, and what a reply selects.

    head = PushHeader.decode(msg, num_workers)   # ProtocolError if a field is malformed
    part = decode_part(head, msg.tensors, store)  # RefusedError if the tensors are
    pending = PendingPush.start(clock, weight, store, worker)
    pending.check(part); pending.add(part)  # check first: a refused part changes nothing
    if pending.complete: ...                # every chunk arrived and the final part with them
    Selection.of_pull(store, keys).tensors(store)   # what a reply carries

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

from pslm.errors import RefusedError
from pslm.ps.core.push import PushHeader
from pslm.ps.server.shard import Grad, ShardStore
from pslm.wire.codecs import Codec, get_codec
from pslm.wire.message import Message

ROW_TENSORS = 3
"""Tensors per row chunk in a push: rows, values, rows wanted back."""


@dataclass(slots=True)
class Selection:
    """The chunks a reply carries: the dense pieces, whole chunks by position, rows of row
    chunks."""

    pieces: bool = False
    """All dense chunks, as pieces."""
    spans: list[tuple[int, int]] = field(default_factory=list)
    """Runs of whole chunks (shard positions [lo, hi)), one tensor each."""
    rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """(position, rows) of row chunks: those rows' values, one tensor each."""

    @classmethod
    def of_pull(cls, store: ShardStore, keys: list[int] | None) -> Selection:
        """A pull: everything (dense pieces, then every row chunk whole), or ``keys`` whole."""
        if keys is None:
            return cls(True, [(p, p + 1) for p in range(store.n_dense, len(store.chunks))])
        return cls(False, [(store.position[k], store.position[k] + 1) for k in keys])

    @property
    def dense_only(self) -> bool:
        """The dense pieces and nothing else."""
        return self.pieces and not self.spans and not self.rows

    def dense_spans(self, store: ShardStore) -> list[tuple[int, int]]:
        """The dense chunks a reply carries, as shard positions [lo, hi)."""
        if self.pieces:
            return [(0, store.n_dense)]
        return [(lo, min(hi, store.n_dense)) for lo, hi in self.spans if lo < store.n_dense]

    def tensors(self, store: ShardStore) -> list[torch.Tensor]:
        """Views of the current parameters (rows: a gathered copy)."""
        n_pieces = len(store.keyspace.pieces(store.server))
        out = list(store.packed[:n_pieces]) if self.pieces else []
        out += [store.span(lo, hi) for lo, hi in self.spans]
        out += [store.rows_of(p, rows) for p, rows in self.rows]
        return out


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
class Reply:
    """A push part waiting for the update, to be answered with its chunks' new values."""

    priority: int
    peer: bytes
    msg: Message
    selection: Selection


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

    def check(self, part: Part) -> None:
        """Refuse a part that repeats a chunk, or a final part that leaves chunks missing."""
        if any(self.grads[p] is not None for p in part.positions):
            raise RefusedError(
                f"push for clock {self.clock} repeats chunks already pushed", code="duplicate"
            )
        if part.final and self.missing > len(part.positions):
            raise RefusedError(
                f"the final part of the push for clock {self.clock} leaves "
                f"{self.missing - len(part.positions)} chunks missing",
                code="bad_shape",
            )

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
