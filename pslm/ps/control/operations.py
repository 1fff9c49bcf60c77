"""What operators do to a running job, and how a job ends: live settings and workers added
or removed (``pslm ctl``), finalizing workers, nodes leaving, shutdown.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pslm.errors import ClusterError
from pslm.ps.control.base import SchedulerState
from pslm.ps.core import protocol
from pslm.wire.message import Message

log = logging.getLogger("pslm.scheduler")


class Operations(SchedulerState):
    """The scheduler's live control and shutdown."""

    # --- live control ----------------------------------------------------------------------

    def _ctl(self, peer: bytes, msg: Message) -> Message:
        """A change of the job's live settings (``pslm ctl``): the new version."""
        action = protocol.field(msg, "action", str)
        values = protocol.field(msg, "values", dict, {})
        if self.stopping_since is not None:
            raise ClusterError("the cluster is stopping")
        if action == "remove-worker":
            return msg.reply(**self._remove_worker(protocol.field(msg, "node", str)))
        if action == "add-worker":
            return msg.reply(**self._add_worker())
        doc = self.steering.newest.change(action, values)
        self.steering.add(doc)
        log.info("steering version %d: %s", doc.version, doc.what)
        for node in self.nodes.values():  # at once, not with the next heartbeat
            if node.role == "worker" and node.live and node.peer:
                self._send(node.peer, Message("steering", body=doc.to_dict()))
        self._changed()
        return msg.reply(steering=doc.to_dict())

    def _remove_worker(self, node_id: str) -> dict[str, Any]:
        """``pslm ctl remove-worker``: the worker hands its shares over at its next clock
        boundary (each to the worker with the fewest) and leaves; the job goes on."""
        node = self.nodes.get(node_id)
        if node is None or node.role != "worker" or not node.live:
            raise ClusterError(f"{node_id} is not a live worker")
        if node.rank in self.leases.retired:
            raise ClusterError(f"{node_id} is leaving already")
        if "shares_move" not in node.stats:
            raise ClusterError(f"{node_id} has not reported yet: try again in a second")
        if node.stats.get("shares_move") != 1.0:
            raise ClusterError(
                f"{node_id}'s shares cannot move to other workers (ssp, asp, local sgd and "
                "overlap keep each share on its worker): stop the job instead"
            )
        try:
            moves = self.leases.retire(node.rank, self._trainers())
        except ValueError as exc:
            raise ClusterError(f"cannot remove {node_id}: {exc}") from None
        for share, taker in moves:
            log.info("%s leaves: share %d will move to worker-%d", node_id, share, taker)
        self._changed()
        return {"removed": node_id, "moves": {str(s): t for s, t in moves}}

    def _add_worker(self) -> dict[str, Any]:
        """``pslm ctl add-worker``: ask the launcher for a new worker process, which takes the
        rank of a removed or dead worker and a share from a worker holding two or more."""
        free = [
            n.rank
            for n in self.nodes.values()
            if n.role == "worker" and (n.state == "dead" or n.rank in self.leases.retired)
        ]
        if len(free) <= self.added_workers - self.joined_added:
            raise ClusterError(
                f"the job has its {self.cfg.num_workers} workers (one per share of the batch): "
                "a worker can be added in place of a removed or dead one"
            )
        self.added_workers += 1
        log.info("asked the launcher for a worker (%d so far)", self.added_workers)
        self._changed()
        return {"add_workers": self.added_workers}

    def _steering(self, peer: bytes, msg: Message) -> Message:
        """A version of the live settings ({version}; default the newest)."""
        version = protocol.field(msg, "version", int, self.steering.newest.version)
        doc = self.steering.get(version)
        if doc is None:
            raise ClusterError(f"steering version {version} is not kept any more")
        return msg.reply(steering=doc.to_dict())

    # --- shutdown ---------------------------------------------------------------------------

    def _finalize(self, peer: bytes, msg: Message) -> Message | None:
        node = self._node(msg)
        if node.role != "worker":
            raise ClusterError("only workers finalize")
        removed = node.rank in self.leases.retired and not self.leases.held_by(node.rank)
        if removed or self.stopping_since is not None:  # it leaves; nothing to wait for
            node.state = "exited"
            why = "removed" if removed else "the cluster stops"
            log.info("%s left the job (%s)", node.id, why)
            self._excuse(node.id)
            self._changed()
            return msg.reply()
        self.finalizing[node.id] = (peer, msg)
        self._finish_if_done()
        return None

    def _finish_if_done(self) -> None:
        """Stop the cluster once every live worker that holds shares has finalized (the stop
        answers them)."""
        if not self.finalizing or self.stopping_since is not None:
            return
        holders = {
            n.id
            for n in self.nodes.values()
            if n.role == "worker" and n.live and self.leases.held_by(n.rank)
        }
        if holders <= set(self.finalizing):
            self._stop("every worker finalized")

    def _leave(self, peer: bytes, msg: Message) -> Message:
        node = self._node(msg)
        if node.peer and peer != node.peer:  # (b"": a recovered scheduler knows no peers)
            log.warning(
                "%s: a leave from another process than the one registered: ignored", node.id
            )
            return msg.reply()  # (one that a new process replaced since; it has no say)
        if node.role == "server" and node.live and self.complete and self.stopping_since is None:
            # not told to stop (Ctrl-C, an unhandled error): its shard is served on as after
            # a death, not left waiting for a server that is gone
            self._server_died(node, "left while the job runs", left=True)
            return msg.reply()
        node.state = "exited"
        log.info("%s left", node.id)
        self._excuse(node.id)
        self._changed()
        return msg.reply()

    def _shutdown(self, peer: bytes, msg: Message) -> Message:
        self._stop("shutdown requested")
        return msg.reply()

    def _stop(self, why: str) -> None:
        if self.stopping_since is not None:
            return
        log.info("shutting down: %s", why)
        self.stopping_since = time.monotonic()
        finalizing, self.finalizing = self.finalizing, {}
        for node_id, (peer, req) in finalizing.items():  # whatever stopped it: answered
            self.nodes[node_id].state = "exited"
            self._excuse(node_id)
            self._send(peer, req.reply())
        for node in self.nodes.values():  # (a recovered scheduler tells them by heartbeat)
            if node.role == "server" and node.state != "exited" and node.peer:
                self._send(node.peer, Message("shutdown"))
        self._changed()

    def _done(self) -> bool:
        if self.stopping_since is None:
            return False
        servers = [n for n in self.nodes.values() if n.role == "server"]
        waiting = [  # live workers without shares, until they heard of the stop
            n
            for n in self.nodes.values()
            if n.role == "worker" and n.live and n.id not in self.told_stop
        ]
        if all(n.state in ("exited", "dead") for n in servers) and not waiting:
            return True
        if time.monotonic() - self.stopping_since > self.cfg.shutdown_timeout:
            log.warning("servers did not leave within %g s", self.cfg.shutdown_timeout)
            return True
        return False
