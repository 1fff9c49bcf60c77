"""A worker's side of failover: where each shard is served now, and what to send again when
that changes.

    failover = Failover(scheduler="tcp://...", servers=me.servers, epoch=me.epoch)
    failover.retain(server, clock, msg)     # a BSP push acknowledged before it is applied
    failover.applied(server, version)       # the server has applied what came before
    failover.follow(heartbeat, channel, memory)   # before sends and while waiting

When a server dies, the scheduler promotes its shard's backup in the shard table, which every
node learns of through its heartbeats; the worker then sends that shard's requests to the new
server, and sends again every one the old server left unanswered - and the plain pushes it
acknowledged but may not have applied yet (BSP acknowledges a push on arrival). The servers
take duplicates as such (exactly once). A restarted scheduler (a new ``epoch``) gets what the
old one left unanswered the same way.
"""

from __future__ import annotations

import logging
from functools import partial

from pslm.ps.client.shm import WorkerMemory
from pslm.ps.control.node import Heartbeat
from pslm.wire.message import Message
from pslm.wire.transport import Channel

log = logging.getLogger("pslm.client")


class Failover:
    """Where each shard is served, as the shard table last said, and the pushes to keep."""

    def __init__(self, *, scheduler: str, servers: tuple[str, ...], epoch: str):
        self.scheduler = scheduler
        self.servers = list(servers)
        """Where each shard is served now."""
        self.table = -1
        """The version of the shard table followed last."""
        self.epoch = epoch
        """The scheduler's incarnation followed last."""
        self.retained: dict[int, list[tuple[int, Message]]] = {}
        """Server -> plain pushes (clock, message) it acknowledged but may not have applied
        yet, with copies of their tensors: sent again to a server that takes the shard over."""

    def retain(self, server: int, clock: int, msg: Message) -> None:
        """Keep a copy of a push ``server`` will acknowledge before applying it."""
        copy = Message("push", body=msg.body, tensors=[t.clone() for t in msg.tensors])
        self.retained.setdefault(server, []).append((clock, copy))

    def applied(self, server: int, version: int) -> None:
        """``server`` is at ``version``: the pushes for earlier clocks need not be kept."""
        if server in self.retained:
            self.retained[server] = [(c, m) for c, m in self.retained[server] if c >= version]

    def follow(self, heartbeat: Heartbeat, channel: Channel, memory: WorkerMemory | None) -> None:
        """Send to a shard's new server (its promoted backup) from now on, and send it again
        every request its old server left unanswered. Cheap: the table comes with the
        heartbeats."""
        epoch = heartbeat.epoch
        if epoch and epoch != self.epoch:  # a new scheduler: what the old one left unanswered
            self.epoch = epoch
            again = channel.reroute("scheduler", self.scheduler)
            log.warning("the scheduler restarted; %d requests sent to it again", again)
        table = heartbeat.table
        if table is None or table.version == self.table:
            return
        self.table = table.version
        for s, addr in enumerate(table.servers):
            if addr and addr != self.servers[s]:
                self.servers[s] = addr
                if memory is not None:
                    memory.drop(s)  # the socket from now on: the new server may be elsewhere
                again = channel.reroute(f"server-{s}", addr, partial(_unshared, memory, s))
                for _, msg in self.retained.get(s, []):
                    channel.send_unawaited(f"server-{s}", msg)
                    again += 1
                log.warning("shard %d is served by %s now; %d requests sent again", s, addr, again)


def _unshared(memory: WorkerMemory | None, server: int, msg: Message) -> Message:
    """A request sent again to ``server``'s new address: a push that went through shared
    memory carries its staged gradients after all (the new server may be elsewhere)."""
    if msg.op != "push" or "shm" not in msg.body or memory is None:
        return msg
    body = {k: v for k, v in msg.body.items() if k != "shm"}
    staged = [g.clone() for g in memory.gradients(server)]
    return Message(msg.op, id=msg.id, body=body, tensors=staged + msg.tensors)
