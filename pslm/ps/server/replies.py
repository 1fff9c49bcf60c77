"""What a server sends back: parameters without copying, refusals, one reply at a time.

    replies = Replies(listener, SharedPaths())
    replies.params(peer, msg, Selection.of_pull(store, None), store, held_s=0.01)
    replies.alone(peer, msg, lambda: ...)      # one of several replies due at once
    replies.writable(store)                    # before an update: no reader still reading

Pull replies go out without copying: they are views of the live parameter buffer. Each one is
tracked, and an update waits until ZeroMQ has finished reading the previous replies
(``writable``), so a reader never sees a half-updated chunk.

A reader that does not drain its socket (its replies still unsent after READER_GRACE) costs
one wait and one copy, once: the shard moves to new memory, the old stays with that reader's
unsent replies, and until they are sent its requests are refused (``slow_reader``, a few bytes)
instead of pinning another copy per update. Training never waits on it again, and memory stays
flat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pslm.errors import RefusedError
from pslm.ps.core import protocol
from pslm.ps.server.shard import ShardStore
from pslm.ps.server.shm import SharedPaths
from pslm.wire.codecs import get_codec
from pslm.wire.message import Message
from pslm.wire.transport import Sent

log = logging.getLogger("pslm.server")

STALL_RECHECK = 1.0
"""Seconds during which a stalled reader's requests are refused without waiting."""
READER_GRACE = 1.0
"""Seconds an update waits for ZeroMQ to finish sending earlier replies before it copies."""


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
class Reply:
    """A push part waiting for the update, to be answered with its chunks' new values."""

    priority: int
    peer: bytes
    msg: Message
    selection: Selection
    share: int
    """The share whose push the part is (how long it was held is counted from its arrival)."""


class Outbox(Protocol):
    """Where replies go: the server's ``Listener`` (or, in a test, what records them)."""

    def send(self, peer: bytes, msg: Message, *, track: bool = False) -> Sent | None: ...


class Replies:
    """A server's way out to its peers: parameters, refusals, acknowledgements."""

    def __init__(self, listener: Outbox, shared: SharedPaths):
        self.listener = listener
        self.shared = shared
        """Workers on this machine that take replies through shared memory."""
        self.trackers: list[tuple[bytes, Sent]] = []
        """Replies (by peer) that may still be read from the parameter memory."""
        self.rechecked: dict[bytes, float] = {}
        """Stalled peer -> until when its requests are refused without waiting."""
        self.stalled: dict[bytes, list[Sent]] = {}
        """Peers whose replies were not sent within READER_GRACE, with those replies: they
        are refused until every one is sent."""
        self.bytes_out = 0
        """Tensor bytes sent (reported with heartbeats)."""

    def send(self, peer: bytes, msg: Message) -> None:
        self.listener.send(peer, msg)

    def refuse(self, peer: bytes, msg: Message, code: str, text: str) -> None:
        """An ``error`` reply to a request; a notice that fails is only logged."""
        if msg.id:
            self.listener.send(peer, protocol.error(msg, code, text))
        else:
            log.warning("dropped %r notice: %s", msg.op, text)

    def alone(self, peer: bytes, msg: Message, answer: Callable[[], None]) -> bool:
        """Run ``answer`` (one of several replies due at once); if it fails, refuse ``msg``
        alone, so that the others go on (requests are checked on arrival: a bug's way out).
        Returns whether it was answered."""
        try:
            answer()
        except Exception as exc:
            log.exception("answering a %r failed", msg.op)
            self.refuse(peer, msg, getattr(exc, "code", "internal"), str(exc))
            return False
        return True

    def params(
        self, peer: bytes, msg: Message, selection: Selection, store: ShardStore, **extra: object
    ) -> None:
        """The values of ``selection`` now, with the version and ``extra`` (views of the live
        buffer where they need no encoding, tracked until ZeroMQ has sent them)."""
        if self._stalled(peer):
            raise RefusedError(
                "your earlier replies are still unread: read them first (a reader that does "
                "not drain its socket is not sent more)",
                code="slow_reader",
            )
        codec = get_codec(protocol.pull_codec(protocol.field(msg, "pull_codec", str, "none")))
        tensors, shm = self.shared.reply(msg, store, selection.tensors(store))
        if not codec.lossless:  # a cast: new tensors, half the bytes
            tensors = [codec.encode(t)[0] for t in tensors]
        self.bytes_out += sum(t.nbytes for t in tensors)
        body = {"version": store.version, **extra, **({"shm": True} if shm else {})}
        dense = selection.dense_only and codec.lossless and not shm  # the pieces as they are
        reply = Message("ok", id=msg.id, body=body, tensors=tensors)
        reply.wire = store.packed_wire if dense else None
        sent = self.listener.send(peer, reply, track=True)
        if sent is not None and not sent.done:
            self.trackers.append((peer, sent))

    def _stalled(self, peer: bytes) -> bool:
        """Whether ``peer`` still has replies unsent since it was found stalled. The first
        request after it was found waits a moment (a reader that just read its reply may be
        ahead of the tracker); later ones within STALL_RECHECK seconds are refused at once,
        so that a stalled reader's requests cannot hold the loop up either."""
        pending = self.stalled.get(peer)
        if pending is None:
            return False
        now = time.monotonic()
        if now >= self.rechecked.get(peer, 0.0):
            self.rechecked[peer] = now + STALL_RECHECK
            deadline = now + 0.05
            pending[:] = [s for s in pending if not s.wait(max(0.0, deadline - time.monotonic()))]
        else:
            pending[:] = [s for s in pending if not s.done]
        if pending:
            return True
        del self.stalled[peer]
        self.rechecked.pop(peer, None)
        log.info("a slow reader caught up")
        return False

    def writable(self, store: ShardStore) -> None:
        """Make sure no earlier reply is still being read from the parameter memory.

        If ZeroMQ has not finished with all of them within READER_GRACE seconds (a slow or
        stalled reader), the shard moves its parameters to a fresh copy, leaving the old memory
        to those readers, so that nobody sees a half-updated chunk and nobody waits on a
        stalled peer.
        """
        for peer in [p for p, sent in self.stalled.items() if all(t.done for t in sent)]:
            del self.stalled[peer]  # (gone, or caught up without asking again)
            self.rechecked.pop(peer, None)
        deadline = time.monotonic() + READER_GRACE
        pending = [(peer, t) for peer, t in self.trackers if not t.done]
        for _, sent in pending:
            if not sent.wait(max(0.0, deadline - time.monotonic())):
                store.relocate_params()
                slow = {peer for peer, t in pending if not t.done}
                for peer, t in pending:
                    if not t.done:
                        self.stalled.setdefault(peer, []).append(t)
                log.warning(
                    "%d reader(s) did not read their replies in %.0f s: updating a copy of the "
                    "parameters, and refusing them until they do",
                    len(slow),
                    READER_GRACE,
                )
                break
        self.trackers = []
