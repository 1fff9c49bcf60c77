"""The registrations of a cluster that is still filling: who asked for which rank, and who
gets which once every node is there. Decisions only: the scheduler sends what they return.

    filling = Filling({"server": 2, "worker": 2})
    refusals = filling.add(node, msg)       # ClusterError if its rank is taken or its role full
    if filling.full:
        for node, msg in filling.ranked(): ...   # every node with its rank, in order
"""

from __future__ import annotations

import logging
import socket

from pslm.errors import ClusterError
from pslm.ps.control.records import NodeRecord, pid_alive
from pslm.ps.core import protocol
from pslm.wire.message import Message

log = logging.getLogger("pslm.scheduler")

Answer = tuple[bytes, Message]


class Filling:
    """Registrations waiting for the cluster to fill."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        """Processes of each role the cluster waits for."""
        self.joining: list[tuple[NodeRecord, Message]] = []

    @property
    def full(self) -> bool:
        return len(self.joining) == sum(self.sizes.values())

    def add(self, node: NodeRecord, msg: Message) -> list[Answer]:
        """Take ``node``'s registration (answered once the cluster is full); returns the
        refusals of registrations dropped to make room (their process is gone). ClusterError
        if the rank it asks for is taken or its role has every place filled."""
        role, limit = node.role, self.sizes[node.role]
        taken = self._of(role)
        refusals: list[Answer] = []
        if self._clash(node, taken) or len(taken) >= limit:
            # a node that died meanwhile may hold the place
            refusals = self._drop_gone(role)
            taken = self._of(role)
        if self._clash(node, taken):
            raise ClusterError(f"{role} rank {node.requested_rank} is already taken")
        if len(taken) >= limit:
            raise ClusterError(f"already {limit} {role}s registered")
        self.joining.append((node, msg))
        log.info("%s registered from %s (%d/%d)", role, node.host, len(taken) + 1, limit)
        return refusals

    def ranked(self) -> list[tuple[NodeRecord, Message]]:
        """Every registration with its rank (the one asked for, else the lowest free one),
        in the order they came; the registrations are taken."""
        for role in protocol.ROLES:
            members = self._of(role)
            free = sorted(set(range(self.sizes[role])) - {n.requested_rank for n in members})
            for n in members:
                n.rank = n.requested_rank if n.requested_rank >= 0 else free.pop(0)
        joined, self.joining = self.joining, []
        return joined

    def give_up(self, why: str) -> list[Answer]:
        """The refusals of every registration (the cluster did not fill)."""
        answers = [(n.peer, protocol.error(msg, "startup_timeout", why)) for n, msg in self.joining]
        self.joining = []
        return answers

    def _of(self, role: str) -> list[NodeRecord]:
        return [n for n, _ in self.joining if n.role == role]

    @staticmethod
    def _clash(node: NodeRecord, taken: list[NodeRecord]) -> bool:
        return node.requested_rank >= 0 and node.requested_rank in {n.requested_rank for n in taken}

    def _drop_gone(self, role: str) -> list[Answer]:
        """Forget the registrations of ``role`` whose process is gone (on this host:
        elsewhere a process cannot be looked at, and nodes send no heartbeats before they are
        members), so that a node that died meanwhile leaves its place to its restart. Each is
        told (if it lives after all, where pids are not this host's, it hears why instead of
        waiting for the cluster)."""
        here = socket.gethostname()
        kept, refusals = [], []
        for node, msg in self.joining:
            if node.role == role and node.host == here and not pid_alive(node.pid):
                why = f"{role} registration (rank {node.requested_rank}, pid {node.pid}) dropped"
                log.warning("%s: its process is gone", why)
                told = (
                    f"{why}: host {here} has no such process; a node in another pid namespace "
                    "(a container) needs a host name of its own"
                )
                refusals.append((node.peer, protocol.error(msg, "gone", told)))
                continue
            kept.append((node, msg))
        self.joining = kept
        return refusals
