"""Barriers: a group of nodes meets, each bringing a few numbers, and every member gets their
sums once all have arrived. Decisions only: the scheduler sends what they return.

    barriers = Barriers()
    answers = barriers.arrive("eval-7", "workers", node, peer, msg, {"loss": 3.1},
                              members=lambda: {"worker-0", "worker-1"}, nodes=nodes)
    answers = barriers.excuse("worker-1", nodes)   # it died: no barrier waits for it
    for peer, reply in answers: listener.send(peer, reply)

A member that arrives after the release (it was thought dead meanwhile) is to get the same
answer: the last RELEASED_KEPT barriers' sums are kept (``released``), and kept across a
scheduler restart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pslm.errors import ClusterError, ProtocolError
from pslm.ps.control.records import NodeRecord
from pslm.wire.message import Message

MAX_VALUES = 64
RELEASED_KEPT = 64
"""Released barriers whose sums are kept, for a member that arrives after the release."""

Answer = tuple[bytes, Message]


@dataclass(slots=True)
class Barrier:
    group: str
    members: set[str] = field(default_factory=set)
    """Who must arrive: the group's live nodes when the barrier began (workers: those holding
    shares), less those that die or leave meanwhile."""
    waiting: dict[str, Message] = field(default_factory=dict)  # node id -> request
    peers: dict[str, bytes] = field(default_factory=dict)
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # node id -> values

    def sums(self, members: list[NodeRecord]) -> dict[str, float]:
        """Every value summed over the members, in rank order (the same sum every run)."""
        out: dict[str, float] = {}
        for node in sorted(members, key=lambda n: (n.role, n.rank)):
            for name, value in self.values.get(node.id, {}).items():
                out[name] = out.get(name, 0.0) + value
        return out


class Barriers:
    """The barriers under way, and the sums of the last ones released."""

    def __init__(self, released: dict[str, dict[str, float]] | None = None):
        self.open: dict[str, Barrier] = {}
        self.released: dict[str, dict[str, float]] = released or {}

    def arrive(
        self,
        name: str,
        group: str,
        node: NodeRecord,
        peer: bytes,
        msg: Message,
        given: dict[str, Any],
        members: Callable[[], set[str]],
        nodes: Mapping[str, NodeRecord],
    ) -> list[Answer]:
        """``node`` reached barrier ``name`` of ``group`` with request ``msg`` and values
        ``given``; the answers now due. ``members()``: who must arrive, asked when the barrier
        begins."""
        if name not in self.open:
            self.open[name] = Barrier(group, members() | {node.id})
        barrier = self.open[name]
        if barrier.group != group:
            raise ClusterError(f"barrier {name!r} is for {barrier.group}, not {group}")
        barrier.values[node.id] = values(given)
        barrier.waiting[node.id] = msg
        barrier.peers[node.id] = peer
        barrier.members.add(node.id)
        return self._release(name, nodes)

    def excuse(self, node_id: str, nodes: Mapping[str, NodeRecord]) -> list[Answer]:
        """``node_id`` is live no more (dead, left, finalized): no barrier waits for it; the
        answers of those complete without it."""
        answers = []
        for name in list(self.open):
            self.open[name].members.discard(node_id)
            answers += self._release(name, nodes)
        return answers

    def _release(self, name: str, nodes: Mapping[str, NodeRecord]) -> list[Answer]:
        """The answers of a barrier whose members have all arrived (the dead excused)."""
        barrier = self.open[name]
        if not barrier.members <= set(barrier.waiting):
            return []
        arrived = [nodes[m] for m in barrier.waiting if m in nodes]
        sums = barrier.sums(arrived)
        answers = [(barrier.peers[n], req.reply(values=sums)) for n, req in barrier.waiting.items()]
        del self.open[name]
        self.released[name] = sums
        while len(self.released) > RELEASED_KEPT:
            del self.released[next(iter(self.released))]
        return answers


def values(raw: dict[str, Any]) -> dict[str, float]:
    """A barrier's values: at most MAX_VALUES names, each a number; ProtocolError if not."""
    if len(raw) > MAX_VALUES:
        raise ProtocolError(f"barrier: at most {MAX_VALUES} values")
    out = {}
    for name, value in raw.items():
        if (
            not isinstance(name, str)
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            raise ProtocolError("barrier: values map names to numbers")
        out[name] = float(value)
    return out
