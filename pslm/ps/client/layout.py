"""Where a server's chunks live in a worker's tensors, and how they travel.

    layout = Layout.of(keyspace, num_servers)       # every server's Slots, in shard order
    slot = Slot(key, name, offset, length)          # one chunk of one named tensor
    span = span_of(tensors, run)                    # one view over back-to-back chunks, or None
    runs = runs_of(slots, grads)                    # chunks that can travel as one tensor
    copy_run(t, run, out, check_only=False)         # a reply tensor into the caller's tensors
    plan = Plan.make(grads, out, layout, pieces)    # a push_pull between two mappings, once

The client (``pslm.ps.client.client``) keeps one list of Slots per server, in the server's
shard order; messages carry pieces, runs or single chunks of them (``pslm.ps.server.intake``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from pslm.errors import ProtocolError
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.push import PushPart
from pslm.wire.message import Message, encode_tensors

PART_BYTES = 16 << 20
"""A planned push to one server of more dense bytes than this travels in parts of about this
size (``Plan``)."""


class Slot(NamedTuple):
    """Where one chunk lives in the caller's tensors."""

    key: int
    name: str
    offset: int
    length: int
    width: int = 0
    """Row chunks: elements per row (0: a dense chunk)."""
    position: int = 0
    """Where the chunk stands in its server's shard order."""

    def view(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This chunk of ``tensors``: a 1-D view of its tensor."""
        return tensors[self.name].reshape(-1)[self.offset : self.offset + self.length]

    def rows_in(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows of sorted global ``rows`` that fall in this row chunk."""
        first = self.offset // self.width
        lo, hi = torch.searchsorted(rows, torch.tensor([first, first + self.length // self.width]))
        return rows[int(lo) : int(hi)]


@dataclass(frozen=True, slots=True)
class Layout:
    """Every server's chunks as Slots of the caller's tensors, in each server's shard order:
    its dense chunks first, then the chunks of row tensors."""

    keyspace: KeySpace
    slots: list[list[Slot]]

    @classmethod
    def of(cls, ks: KeySpace, num_servers: int) -> Layout:
        slots = [
            [
                Slot(c.key, t.name, c.offset, c.length, t.row_width if t.rows else 0, i)
                for i, c in enumerate(ks.shard(s))
                for t in [ks.tensors[c.tensor]]
            ]
            for s in range(num_servers)
        ]
        return cls(ks, slots)

    def dense(self, server: int) -> list[Slot]:
        """``server``'s dense chunks."""
        return self.slots[server][: self.keyspace.dense(server)]

    def rows(self, server: int) -> list[Slot]:
        """``server``'s chunks of row tensors."""
        return self.slots[server][self.keyspace.dense(server) :]


@dataclass(slots=True)
class Expect:
    """What a reply from one server carries, in order: the dense pieces (``pieces``), runs of
    whole chunks (``runs``, one tensor each), then the wanted rows of row chunks (``rows``:
    slot, global rows)."""

    pieces: bool = False
    runs: list[list[Slot]] = field(default_factory=list)
    rows: list[tuple[Slot, torch.Tensor]] = field(default_factory=list)
    shared: bool = False
    """The pieces may come back through shared memory (``pslm.ps.client.shm``)."""


def span_of(tensors: Mapping[str, torch.Tensor], run: Sequence[Slot]) -> torch.Tensor | None:
    """One 1-D view over the chunks ``run`` of ``tensors`` if they lie back to back in one
    storage (as ``PSClient.allocate`` lays them out), else None (then they travel copied).
    Found from the tensors' addresses, without making a view per chunk: this is on every
    step's path."""
    first = tensors[run[0].name]
    storage = first.untyped_storage()
    size = first.element_size()
    start = end = first.data_ptr() + run[0].offset * size
    for slot in run:
        t = tensors[slot.name]
        if t.dtype != first.dtype or not t.is_contiguous():
            return None
        if t.untyped_storage().data_ptr() != storage.data_ptr():
            return None
        if t.data_ptr() + slot.offset * size != end:
            return None
        end += slot.length * size
    offset = (start - storage.data_ptr()) // size
    return first.detach().as_strided(((end - start) // size,), (1,), offset)  # (no autograd)


def gather(tensors: Mapping[str, torch.Tensor], run: Sequence[Slot]) -> torch.Tensor:
    """The chunks ``run`` of ``tensors`` as one 1-D tensor: their span if they lie back to
    back, else a fresh copy (zmq may still be sending an earlier one)."""
    span = span_of(tensors, run)
    return span if span is not None else torch.cat([s.view(tensors) for s in run])


def runs_of(slots: Sequence[Slot], grads: Mapping[str, torch.Tensor]) -> list[list[Slot]]:
    """``slots`` (one server's, in shard order) in runs: consecutive positions whose
    gradients lie back to back in memory travel as one tensor."""
    runs: list[list[Slot]] = []
    for slot in slots:
        if runs and slot.position == runs[-1][-1].position + 1:
            if span_of(grads, [runs[-1][-1], slot]) is not None:
                runs[-1].append(slot)
                continue
        runs.append([slot])
    return runs


def copy_run(
    t: torch.Tensor, run: list[Slot], out: Mapping[str, torch.Tensor], check_only: bool
) -> None:
    """Copy ``t``, the values of the chunks ``run`` back to back, into ``out``."""
    if t.dim() != 1 or t.numel() != sum(s.length for s in run) or not t.is_floating_point():
        raise ProtocolError(f"reply tensor for {run[0].name!r}... has the wrong size or type")
    if check_only:
        return
    span = span_of(out, run)
    if span is not None:
        span.copy_(t)
        return
    for slot, part in zip(run, t.split([s.length for s in run]), strict=True):
        slot.view(out).copy_(part)


def sq_norm(grads: Mapping[str, torch.Tensor]) -> float:
    """The squared norm of all of ``grads``: fp32 norms per tensor, squared and summed in
    float64 in the mapping's order (what SSP/ASP clip each push by)."""
    return sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads.values())


def _parts(pieces: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Pieces in parts of at least PART_BYTES (the last may be smaller), as ranges [a, b)."""
    parts: list[tuple[int, int]] = []
    a = size = 0
    for i, piece in enumerate(pieces):
        size += piece.numel() * piece.element_size()
        if size >= PART_BYTES:
            parts.append((a, i + 1))
            a, size = i + 1, 0
    if a < len(pieces):
        parts.append((a, len(pieces)))
    return parts


def signature(tensors: Mapping[str, torch.Tensor]) -> list[tuple[Any, ...]]:
    """What a Plan over ``tensors`` depends on: each name, tensor, address, shape, strides and
    dtype (a tensor given new storage or a new shape in place changes it)."""
    return [(n, id(t), t.data_ptr(), t.shape, t.stride(), t.dtype) for n, t in tensors.items()]


@dataclass(slots=True)
class Plan:
    """A ``push_pull`` between one pair of mappings, worked out once: for each server, the
    spans of the gradients its push carries and of ``out`` that its reply fills, one per
    piece. Valid while both mappings keep the tensors they had (``key``); it holds them, so
    their ids stay theirs.

    A server's pieces travel in one message, or, over PART_BYTES of them, in parts of about
    PART_BYTES (``pslm.ps.server.intake``): the server answers each part as soon as its chunks are
    updated, and its new values are copied into ``out`` while the next part is on its way."""

    key: list[tuple[Any, ...]]
    pushes: list[list[torch.Tensor]]
    messages: list[list[tuple[PushPart | None, list[torch.Tensor], Any]]]
    """Each server's push messages: (which part of the push it is, or None for a whole push;
    tensors; the tensors encoded once, ``Message.wire``)."""
    parts: list[list[tuple[int, int]]]
    """Each server's messages as ranges [a, b) of its pieces."""
    fills: list[list[torch.Tensor]]
    nbytes: int
    """Tensor bytes a push sends."""
    held: tuple[Any, ...]

    @classmethod
    def make(
        cls,
        grads: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        layout: Sequence[Sequence[Slot]],
        pieces: Sequence[Sequence[tuple[int, int]]],
    ) -> Plan | None:
        """None unless every piece is one span in both mappings (``PSClient.allocate``'s
        layout, or tensors of one chunk each); both must hold every dense tensor."""
        pushes: list[list[torch.Tensor]] = []
        fills: list[list[torch.Tensor]] = []
        messages: list[list[tuple[PushPart | None, list[torch.Tensor], Any]]] = []
        parts: list[list[tuple[int, int]]] = []
        for slots, mine in zip(layout, pieces, strict=True):
            pushes.append([])
            fills.append([])
            for lo, hi in mine:
                g, o = span_of(grads, slots[lo:hi]), span_of(out, slots[lo:hi])
                if g is None or o is None:
                    return None
                pushes[-1].append(g)
                fills[-1].append(o)
            groups = _parts(fills[-1])
            if len(groups) <= 1:  # (a server without dense chunks still hears the push)
                messages.append([(None, pushes[-1], encode_tensors(pushes[-1]))])
                parts.append(groups)
                continue
            messages.append([])
            for i, (a, b) in enumerate(groups):
                part = PushPart(
                    keys=[slot.key for lo, hi in mine[a:b] for slot in slots[lo:hi]],
                    runs=[hi - lo for lo, hi in mine[a:b]],  # a piece is a run of chunks
                    seq=i,
                    final=i == len(groups) - 1,
                    priority=i,
                )
                tensors = pushes[-1][a:b]
                messages[-1].append((part, tensors, encode_tensors(tensors)))
            parts.append(groups)
        nbytes = sum(t.numel() * t.element_size() for server in pushes for t in server)
        held = (tuple(grads.values()), tuple(out.values()))
        key = signature(grads) + signature(out)
        return cls(key, pushes, messages, parts, fills, nbytes, held)

    def fill(self, replies: Mapping[int, Message], servers: Mapping[int, int]) -> int:
        """Copy the replies to whole pushes (request id -> Message; ``servers``: request id
        -> server) into ``out``, once every one of them has been checked (all or nothing);
        returns the bytes they carried."""
        for rid, reply in replies.items():
            self._check(reply, servers[rid], self.fills[servers[rid]])
        received = 0
        for rid, reply in replies.items():
            for t, span in zip(reply.tensors, self.fills[servers[rid]], strict=True):
                span.copy_(t)
                received += t.nbytes
        return received

    def fill_part(self, reply: Message, server: int, part: int) -> int:
        """Check and copy the reply to part ``part`` of ``server``'s push; returns its bytes."""
        a, b = self.parts[server][part]
        spans = self.fills[server][a:b]
        self._check(reply, server, spans)
        for t, span in zip(reply.tensors, spans, strict=True):
            span.copy_(t)
        return sum(t.nbytes for t in reply.tensors)

    @staticmethod
    def _check(reply: Message, s: int, spans: Sequence[torch.Tensor]) -> None:
        if reply.body.get("shm"):
            raise ProtocolError(f"server {s} answered through memory it was not given")
        if len(reply.tensors) != len(spans):
            n = len(reply.tensors)
            raise ProtocolError(f"server {s}: reply has {n} tensors, expected {len(spans)}")
        for t, span in zip(reply.tensors, spans, strict=True):
            if t.dim() != 1 or t.numel() != span.numel() or not t.is_floating_point():
                raise ProtocolError(f"server {s}: a reply tensor has the wrong size or type")
