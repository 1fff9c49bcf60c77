"""A worker's tensors into push messages, and replies back into its tensors: functions over a
``Layout`` (``pslm.ps.client.layout``), no sockets.

    pieces = pack(layout, params, server)                 # server's dense chunks, as pieces
    tensors = encode_dense(feedback, layout, grads, server, share)   # through the push codec
    tensors, expect = encode_rows(grads, layout.rows(server), row_selection(ks, rows))
    scatter(reply, layout, server, expect, out)           # a reply's values into ``out``
    check_tensors(ks, grads, "push", full=True)           # ConfigError unless they fit

What each message carries, tensor by tensor, is ``pslm.ps.server.intake``'s docstring; the
header beside them is ``pslm.ps.core.push.PushHeader``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from pslm.errors import ClusterError, ConfigError, ProtocolError
from pslm.ps.client.layout import Expect, Layout, Slot, copy_run, gather, runs_of
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import KeySpace
from pslm.wire.codecs import Codec, ErrorFeedback
from pslm.wire.message import Message

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Rows = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""Row tensor name -> (rows pushed, rows wanted back)."""


def scalars_for(server: int, scalars: Mapping[str, float] | None) -> dict[str, float]:
    """The scalars a push sends ``server``: server 0 alone averages the others (one is
    enough), and every server takes the ``min.`` ones (live settings it applies itself)."""
    return {k: float(v) for k, v in (scalars or {}).items() if server == 0 or k.startswith("min.")}


def pack(layout: Layout, tensors: Mapping[str, torch.Tensor], server: int) -> list[torch.Tensor]:
    """``server``'s dense chunks of ``tensors`` as message pieces (``KeySpace.pieces``): a
    lone chunk is a view, runs of small chunks are copied into one new buffer."""
    slots = layout.slots[server]
    return [gather(tensors, slots[lo:hi]) for lo, hi in layout.keyspace.pieces(server)]


def pack_all(
    layout: Layout, tensors: Mapping[str, torch.Tensor], server: int
) -> list[torch.Tensor]:
    """All of ``server``'s chunks of ``tensors``: the dense pieces, then each row chunk."""
    return pack(layout, tensors, server) + [s.view(tensors) for s in layout.rows(server)]


def encode_dense(
    feedback: ErrorFeedback,
    layout: Layout,
    grads: Mapping[str, torch.Tensor],
    server: int,
    share: int,
) -> list[torch.Tensor]:
    """All of ``server``'s dense chunks of ``grads`` as a push carries them: in pieces for
    elementwise codecs, else one chunk at a time (``pslm.ps.server.intake``). Lossy codecs
    keep their residual per share and piece (or chunk)."""
    if not feedback.codec.elementwise:
        return encode_runs(feedback, grads, [[slot] for slot in layout.dense(server)], share)
    return [
        part
        for i, piece in enumerate(pack(layout, grads, server))
        for part in feedback.encode(f"{share}/{server}/{i}", piece.reshape(-1))
    ]


def encode_runs(
    feedback: ErrorFeedback,
    grads: Mapping[str, torch.Tensor],
    runs: Sequence[Sequence[Slot]],
    share: int,
) -> list[torch.Tensor]:
    """Runs of dense chunks of ``grads``, a run a tensor, through the push codec."""
    out = []
    for run in runs:
        out += feedback.encode(f"{share}/k{run[0].key}", gather(grads, run))
    return out


def runs_for(
    codec: Codec, slots: Sequence[Slot], grads: Mapping[str, torch.Tensor]
) -> list[list[Slot]]:
    """``slots`` (one server's, in shard order) in runs that travel as one tensor each
    (``pslm.ps.client.layout.runs_of``; single chunks for codecs that are not elementwise)."""
    if not codec.elementwise:
        return [[slot] for slot in slots]
    return runs_of(slots, grads)


def row_selection(
    keyspace: KeySpace, rows: Rows | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(rows pushed, rows wanted) of every row tensor, as sorted unique int64 tensors;
    ConfigError if one is missing or out of range."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in keyspace.row_tensors():
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


def encode_rows(
    grads: Mapping[str, torch.Tensor],
    slots: Sequence[Slot],
    wanted: Rows,
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


def scatter(
    reply: Message,
    layout: Layout,
    server: int,
    expect: Expect,
    out: Mapping[str, torch.Tensor],
    *,
    inbox: list[torch.Tensor] | None = None,
    check_only: bool = False,
) -> None:
    """Copy a reply into ``out``: its dense pieces (from ``inbox``, the worker's shared memory,
    when the reply says they are there), whole chunks, then rows. ProtocolError if a tensor
    has the wrong size; ``check_only``: check, copy nothing."""
    pieces = layout.keyspace.pieces(server) if expect.pieces else []
    given: list[torch.Tensor] = []
    if reply.body.get("shm"):  # the dense pieces are in the inbox
        if not (expect.shared and expect.pieces and inbox is not None):
            raise ProtocolError(f"server {server} answered through memory it was not given")
        given = inbox
    n = len(pieces) + len(expect.runs) + len(expect.rows)
    if len(given) + len(reply.tensors) != n:
        raise ProtocolError(f"reply has {len(reply.tensors)} tensors, expected {n}")
    tensors = iter(given + reply.tensors)
    slots = layout.slots[server]
    # the finite lists first: zip stops on them before taking from the iterator
    for (lo, hi), t in zip(pieces, tensors, strict=False):
        copy_run(t, slots[lo:hi], out, check_only)
    for run, t in zip(expect.runs, tensors, strict=False):
        copy_run(t, run, out, check_only)
    for (slot, rows), t in zip(expect.rows, tensors, strict=False):
        if t.dim() != 1 or t.numel() != len(rows) * slot.width:
            raise ProtocolError(f"reply rows for {slot.name!r} have the wrong size")
        if not check_only:
            dest = out[slot.name].view(-1, slot.width)
            dest.index_copy_(0, rows, t.view(-1, slot.width).to(dest.dtype))


def check_tensors(
    keyspace: KeySpace | None, tensors: Mapping[str, torch.Tensor], what: str, *, full: bool
) -> None:
    """ConfigError unless ``tensors`` match what was given to ``init`` (all of them if
    ``full``): names, shapes, float dtypes, CPU for what is sent, contiguous for what is
    filled."""
    if keyspace is None and what != "init":
        raise ClusterError(f"{what} before init: call init first")
    if keyspace is None:
        return
    ks = keyspace
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


def allocate(layout: Layout, *, pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """New zeroed fp32 tensors, one per tensor of the key space, laid out for the wire:
    tensors that fit one chunk lie back to back in the order of the pieces their server
    expects, so pushing them and pulling into them moves each piece with one copy or none."""
    ks = layout.keyspace
    out: dict[str, torch.Tensor] = {}
    for s, slots in enumerate(layout.slots):
        for lo, hi in ks.pieces(s):
            run = slots[lo:hi]
            whole = [x for x in run if x.offset == 0 and x.length == _numel(ks, x.name)]
            if len(whole) != len(run) or len(run) < 2:
                continue
            buf = torch.zeros(sum(x.length for x in run), pin_memory=pin_memory)
            for x, view in zip(run, buf.split([x.length for x in run]), strict=True):
                out[x.name] = view.view(ks.tensors[ks.index[x.name]].shape)
    for t in ks.tensors:  # tensors of several chunks, or alone in their piece
        if t.name not in out:
            out[t.name] = torch.zeros(t.shape, pin_memory=pin_memory)
    return {t.name: out[t.name] for t in ks.tensors}


def _numel(ks: KeySpace, name: str) -> int:
    return ks.tensors[ks.index[name]].numel


class Said(NamedTuple):
    """What a request's replies said besides their tensors."""

    version: int
    """The servers' parameter version (the lowest, if they differ)."""
    scalars: dict[str, float]
    held_s: float
    staleness: int
    by: tuple[int, ...]
    mode: Consistency | None
    """A new consistency model the servers changed to (a fence's clock was reached)."""


def said(replies: Iterable[Message]) -> Said:
    """What ``replies`` (one per server) said: the lowest version, the scalars, the longest
    hold, the largest staleness, who pushed each share, a new consistency model."""
    version: int | None = None
    scalars: dict[str, float] = {}
    held = 0.0
    staleness = 0
    by: tuple[int, ...] = ()
    mode = None
    for r in replies:
        v = int(r.body.get("version", 0))
        version = v if version is None else min(version, v)
        if isinstance(r.body.get("mode"), dict):
            mode = Consistency.from_dict(r.body["mode"])
        staleness = max(staleness, int(r.body.get("staleness", 0)))
        raw = r.body.get("scalars")
        if isinstance(raw, dict):
            scalars.update({str(k): float(v) for k, v in raw.items()})
        held = max(held, float(r.body.get("held_s", 0.0)))
        if not by and isinstance(r.body.get("by"), list):
            by = tuple(int(w) for w in r.body["by"])
    return Said(version or 0, scalars, held, staleness, by, mode)
