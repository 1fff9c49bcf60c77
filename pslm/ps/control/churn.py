"""Nodes that die and come back while a job runs: a dead server's shard goes to its backup,
a restarted server becomes a backup, a dead worker's shares go to live workers and a restarted
worker takes its rank back (``pslm.ps.control.leases``, ``pslm.ps.control.table``).
"""

from __future__ import annotations

import logging
import socket
import time

from pslm.errors import ClusterError, ProtocolError
from pslm.ps.control.base import SchedulerState
from pslm.ps.control.records import NodeRecord, id_of, pid_alive
from pslm.ps.core import protocol
from pslm.wire.message import Message

log = logging.getLogger("pslm.scheduler")


class Churn(SchedulerState):
    """The scheduler's handling of nodes that come and go."""

    # --- servers that die and come back -----------------------------------------------------

    def _join_server(self, node: NodeRecord, msg: Message) -> Message:
        """A server registering after the start (a dead one restarted) becomes the backup of a
        shard that has none; it takes a dead server's rank."""
        for old in list(self.nodes.values()):  # its old process, if gone, is dead already
            mine = node.requested_rank in (-1, old.rank) and old.role == "server"
            if mine and old.live and old.host == socket.gethostname() and not pid_alive(old.pid):
                self._server_died(old, "its process is gone and a new one took its rank")
        dead = [  # ranks of servers gone, or left for another serves their shard
            n
            for n in self.nodes.values()
            if n.role == "server"
            and not n.live
            and self.shards.role_of(n.id)[0] < 0
            and node.requested_rank in (-1, n.rank)
        ]
        shard = self.shards.without_backup()
        if not dead or shard is None:
            raise ClusterError("every shard has its server and its backup; no server can join")
        node.rank = dead[0].rank
        node.state = "alive"
        node.last_seen = time.monotonic()
        self.nodes[node.id] = node
        self.shards.place(shard, node)
        log.warning("%s joined as the backup of shard %d", node.id, shard)
        self._changed()
        return self._membership(node, msg, late=True)

    def _server_died(self, node: NodeRecord, why: str, *, left: bool = False) -> None:
        """A server is gone (``left``: it said so) while the job runs: its backup serves its
        shard, or it drops out as a backup, or the shard is lost."""
        shard, primary = self.shards.role_of(node.id)
        node.state = "exited" if left else "dead"
        log.warning("%s %s", node.id, why if left else f"is dead: {why}")
        self._excuse(node.id)
        if shard < 0:  # (no role left: demoted, or dropped as a backup before)
            self._changed()
            return
        if not primary:
            self.shards.drop_backup(shard)
            log.warning("shard %d has no backup now", shard)
        elif self.shards.promote(shard):
            log.warning(
                "shard %d: its backup %s serves it now", shard, id_of(self.shards.primary[shard])
            )
        else:  # the launcher starts the cluster again from the last checkpoint
            self.shards.lost.append(shard)
            log.error("shard %d is lost: its server died and it has no synced backup", shard)
            self.exit_code = protocol.SHARD_LOST
            self._stop(f"shard {shard} is lost")
        self.shards.version += 1
        self._changed()

    def _backup(self, peer: bytes, msg: Message) -> Message:
        """A shard's server reports its backup ``ready`` (it holds a whole copy) or ``lost``
        (it fell behind and was dropped); the reply says whether the sender still serves."""
        node = self._node(msg)
        shard = protocol.field(msg, "shard", int)
        state = protocol.field(msg, "state", str)
        address = protocol.field(msg, "address", str)
        if state not in ("ready", "lost"):
            raise ProtocolError(f"backup: state must be ready or lost, got {state!r}")
        if self.shards.role_of(node.id) != (shard, True):
            return msg.reply(serving=False)
        backup = self.shards.backup[shard]
        if backup is not None and backup.address == address:
            if state == "ready":
                self.shards.synced[shard] = True
                log.info("shard %d: %s holds a whole copy", shard, backup.id)
            else:
                log.warning("shard %d: %s fell behind; dropped", shard, backup.id)
                self.shards.drop_backup(shard)
            self._changed()
        return msg.reply(serving=True)

    # --- workers that come and go -----------------------------------------------------------

    def _join(self, node: NodeRecord, msg: Message) -> Message | None:
        """A worker registering after the start takes the rank of a dead one (the one it asks
        for, if any); answered once such a rank is free."""
        workers = [n for n in self.nodes.values() if n.role == "worker"]
        wanted = [n for n in workers if node.requested_rank in (-1, n.rank)]
        for old in wanted:
            if old.live and old.host == socket.gethostname() and not pid_alive(old.pid):
                self._worker_died(old, "its process is gone and a new one took its rank")
        # dead ranks nobody took over yet (a parked worker may just have)
        free = [
            n
            for n in wanted
            if (n.state == "dead" or (n.state == "exited" and n.rank in self.leases.retired))
            and self.nodes.get(n.id) is n
        ]
        if free:
            self._admit(node, msg, free[0].rank)
        elif node.requested_rank < 0 and not any(n.live for n in wanted):
            raise ClusterError("every worker of the cluster has finished; nothing to join")
        elif node.requested_rank < 0 and all(n.live for n in workers):
            raise ClusterError(
                f"the cluster has its {self.cfg.num_workers} workers; a worker can join only "
                "in place of a dead one"
            )
        else:
            self.parked.append((node, msg))
            log.info("a worker asks for rank %d, still alive: it waits", node.requested_rank)
        return None

    def _admit(self, node: NodeRecord, msg: Message, rank: int) -> None:
        self.leases.unretire(rank)  # (in place of a removed worker)
        if self.added_workers > self.joined_added:  # one the launcher was asked for
            self.joined_added += 1
        node.rank = rank
        node.state = "alive"
        node.last_seen = time.monotonic()
        # a finalize the dead one left is not this one's (kept until now: a worker only
        # thought dead that comes back is still answered)
        self.finalizing.pop(node.id, None)
        self.nodes[node.id] = node
        self._send(node.peer, self._membership(node, msg, late=True))
        log.info("%s joined late (pid %d)", node.id, node.pid)
        self._rebalance()
        self._changed()

    def _worker_died(self, node: NodeRecord, why: str) -> None:
        node.state = "dead"
        log.warning("%s is dead: %s", node.id, why)
        for share, taker in self.leases.orphan(node.rank, self._trainers()):
            log.warning("share %d of every batch: worker-%d -> worker-%d", share, node.rank, taker)
        self._excuse(node.id)
        self._finish_if_done()
        parked, self.parked = self.parked, []
        for late, msg in parked:  # one of them takes the rank
            if late.requested_rank in (-1, node.rank) and self.nodes.get(node.id) is node:
                self._admit(late, msg, node.rank)
            else:
                self.parked.append((late, msg))
        self._rebalance()

    def _rebalance(self) -> None:
        for share, joiner in self.leases.rebalance(self._trainers()):
            log.info("share %d will move to worker-%d at a clock boundary", share, joiner)

    def _trainers(self) -> list[int]:
        """The ranks of the live workers that may take a share: not those that finalized
        (they push nothing more)."""
        return [
            n.rank
            for n in self.nodes.values()
            if n.role == "worker" and n.live and n.id not in self.finalizing
        ]

    def _leases(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        stopping = self.stopping_since is not None
        if stopping:
            self.told_stop.add(node.id)
        return msg.reply(**self.leases.to_dict(), stop=stopping)

    def _release(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        share = protocol.field(msg, "share", int)
        clock = protocol.field(msg, "clock", int)
        try:
            taker = self.leases.release(share, node.rank, clock)
        except ValueError as exc:
            raise ClusterError(f"release: {exc}") from None
        log.info("share %d: worker-%d -> worker-%d from clock %d", share, node.rank, taker, clock)
        self._changed()
        return msg.reply(**self.leases.to_dict())
