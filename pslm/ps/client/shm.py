"""Push and pull through shared memory when a worker and a server share a machine.

    mine = WorkerMemory.create(keyspace, servers=[0, 1], rank=0)   # the worker's segment
    msg = Message("attach", body=mine.offer(0, worker=0))          # sent to server 0
    mine.stage(0, pieces)          # a push_pull's dense gradients for server 0, into the segment
    mine.inbox(0)                  # after the reply: server 0's new values, as pieces

The server's side is ``pslm.ps.server.shm.SharedPaths``.

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

import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pslm.errors import ProtocolError
from pslm.ps.core.keyspace import KeySpace
from pslm.wire.message import Message
from pslm.wire.shm import Segment
from pslm.wire.shm import available as shm_available
from pslm.wire.transport import Channel

log = logging.getLogger("pslm.client")


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
        sizes = {s: keyspace.piece_sizes(s) for s in servers}
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


def share_memory(
    channel: Channel, keyspace: KeySpace, servers: Sequence[str], rank: int
) -> WorkerMemory | None:
    """A segment offered to each server on this machine (``servers``: addresses by shard,
    reached on ``channel`` as ``server-N``; blocks for one round trip each). A server that
    refuses it (another machine after all, another process namespace) stays on the socket;
    None if none takes it."""
    if not shm_available():
        return None
    local = [s for s, addr in enumerate(servers) if on_this_machine(addr)]
    memory = WorkerMemory.create(keyspace, local, rank) if local else None
    if memory is None:
        return None
    for s in memory.servers:
        try:
            channel.request(f"server-{s}", Message("attach", body=memory.offer(s, worker=rank)))
        except ProtocolError as exc:
            log.info("server %d stays on the socket: %s", s, exc)
            memory.drop(s)
    if not memory.active:
        memory.close()
        return None
    log.info("shared memory with the servers on this machine: %s", sorted(memory.active))
    return memory


def on_this_machine(address: str) -> bool:
    """Whether ``address`` (tcp://host:port) is a loopback address or one of this host's."""
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        if host == "localhost":
            return True
    try:
        return host in {socket.gethostname(), *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError:
        return False
