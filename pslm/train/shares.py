"""A worker's view of the share leases: which parts of every global batch it trains.

    keeper = ShareKeeper(client)
    shares = keeper.at_boundary(step)     # before a step: releases shares moving away
    keeper.changed()                      # cheap; True once the scheduler changed the leases
    orphans = keeper.taken_over(pushed)   # shares given to this worker since, not yet pushed
    start = keeper.await_share(timeout)   # a late worker: the clock its shares start at

Share r is worker r's until a worker dies (``pslm.ps.control.leases``). The worker holding
share 0 is the leader: it writes metrics and checkpoints.
"""

from __future__ import annotations

import logging
import time

from pslm.errors import ClusterError, RefusedError
from pslm.ps.client.client import PSClient
from pslm.ps.control.leases import Leases

log = logging.getLogger("pslm.shares")

POLL = 0.2
"""Seconds between two questions about leases while waiting for a share."""


class ShareKeeper:
    """``follow`` False (the run cannot hand shares over: SSP, ASP, local SGD, overlap): the
    worker trains its own share, whatever the scheduler says."""

    def __init__(self, client: PSClient, *, follow: bool = True):
        self.client = client
        self.follow = follow
        client.report("shares_move", float(follow))  # whether pslm ctl may remove it
        self.leases = Leases(
            0,
            tuple(range(client.num_workers)),
            {},
            {},
        )
        self.mine = [client.rank] if not client.late else []

    @property
    def num_shares(self) -> int:
        return self.client.num_workers

    @property
    def leader(self) -> bool:
        """Whether this worker holds share 0 (it writes metrics and checkpoints)."""
        return 0 in self.mine

    def changed(self) -> bool:
        """Whether the scheduler has changed the leases since this worker last looked."""
        return self.follow and self.client.lease_version != self.leases.version

    def refresh(self) -> Leases:
        self.leases = self.client.leases()
        return self.leases

    def at_boundary(self, clock: int) -> list[int]:
        """The shares to train at ``clock``: those held, after letting go of the ones that
        move to another worker from this clock on. Empty for a worker that held none (it
        must ``await_share`` and start where its shares do)."""
        if not self.mine:
            return []
        if self.changed():
            self.refresh()
        for share in [s for s in self.leases.mine(self.client.rank) if s in self.leases.moving]:
            try:
                self.leases = self.client.release(share, clock)
                log.info("released share %d from clock %d", share, clock)
            except RefusedError as exc:  # the move was called off meanwhile: look again
                log.info("share %d stays: %s", share, exc)
                self.refresh()
        self.mine = self.leases.mine(self.client.rank)
        return list(self.mine)

    def taken_over(self, pushed: list[int]) -> list[int]:
        """Shares given to this worker since it last looked that are not in ``pushed`` (a dead
        worker's, to push for the clock in progress)."""
        self.refresh()
        held = self.leases.mine(self.client.rank)
        new = [s for s in held if s not in pushed]  # moving or not: pushed until released
        self.mine = held
        for share in new:
            log.warning("took over share %d (its worker died)", share)
        return new

    def await_share(self, timeout: float) -> tuple[bool, int | None]:
        """A worker without shares (it joined late, or was thought dead): block until some
        come to it. Returns (False, None) if the job ends first, else (True, the clock they
        start at), the clock None for shares nobody held (every worker had died): they start
        where the servers stand."""
        deadline = time.monotonic() + timeout
        beat = self.client.heartbeat
        while True:
            if beat.stop_requested.is_set() or beat.lost.is_set():
                return False, None
            leases = self.refresh()
            if leases.stop:  # the job is over
                beat.stop_requested.set()
                return False, None
            held = leases.mine(self.client.rank)
            if not held and self.client.rank in leases.retired:
                log.info("removed from the job (pslm ctl remove-worker): leaving")
                return False, None
            if held:
                self.mine = held
                starts = [leases.starts[s] for s in held if s in leases.starts]
                return True, min(starts) if len(starts) == len(held) else None
            if time.monotonic() > deadline:
                raise ClusterError(f"no share came to this worker within {timeout:g} s")
            time.sleep(POLL)
