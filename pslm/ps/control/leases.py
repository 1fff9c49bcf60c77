"""Who trains which share of every global batch: the scheduler's leases.

    leases = ShareLeases(num_shares=4)          # share r -> worker r
    leases.orphan(dead=1, live=[0, 2, 3])       # worker 1 died: its share to a live holder
    leases.rebalance(joiners=[1])               # worker 1 is back: a share will move to it
    leases.release(share=1, worker=2, clock=57) # its holder lets it go before clock 57
    leases.held_by(2)                           # [2]
    leases.retire(worker=3, live=[0, 1, 2])     # pslm ctl remove-worker: its shares move away

Every global batch is cut into as many shares as the job started with workers; share r is
worker r's until that worker dies. Then the live worker with the fewest shares takes it over
at once and pushes it from the clock it is working on, so no step misses any part of its batch
(servers take one push per share and clock, so a share pushed twice counts once). A worker that
(re)joins gets a share back by a transfer: its holder finishes a clock, releases the share
from the next one, and the joiner starts there. ``version`` changes with every change, so
that workers can tell cheaply (from heartbeat replies) when to look again.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pslm.errors import ProtocolError

NOBODY = -1


class ShareLeases:
    """Share -> holder, the clock from which a transferred share's new holder pushes it, and
    the transfers waiting for a release."""

    def __init__(self, num_shares: int):
        self.holders = list(range(num_shares))
        self.starts: dict[int, int] = {}
        """Share -> the first clock its current holder pushes (after a transfer)."""
        self.moving: dict[int, int] = {}
        """Share -> the worker it moves to once its holder releases it."""
        self.retired: set[int] = set()
        """Workers removed from the job (``pslm ctl remove-worker``): they hand their shares
        over, take none, and leave."""
        self.version = 0

    def held_by(self, worker: int) -> list[int]:
        return [s for s, w in enumerate(self.holders) if w == worker]

    def orphan(self, dead: int, live: list[int]) -> list[tuple[int, int]]:
        """Give the shares of ``dead`` to the ``live`` workers that hold shares (fewest
        first, then lowest rank) - or, if none does, to the other live workers; returns
        (share, new holder) pairs."""
        moved = []
        self.moving = {s: w for s, w in self.moving.items() if w != dead}
        others = [w for w in live if w != dead and w not in self.retired]
        holders = [w for w in others if self.held_by(w)] or others
        for share in self.held_by(dead):
            if not holders:
                self.holders[share] = NOBODY
                moved.append((share, NOBODY))
                continue
            taker = min(holders, key=lambda w: (len(self.held_by(w)), w))
            self.holders[share] = taker
            self.starts.pop(share, None)  # from whatever clock the taker is at
            self.moving.pop(share, None)
            moved.append((share, taker))
        if moved:
            self.version += 1
        return moved

    def retire(self, worker: int, live: list[int]) -> list[tuple[int, int]]:
        """Remove ``worker`` from the job: each of its shares moves, once it releases it, to
        the ``live`` worker with the fewest shares; returns (share, taker) pairs. ValueError
        if no other worker could take them."""
        others = [w for w in live if w != worker and w not in self.retired]
        if not others:
            raise ValueError("it is the last worker: nobody could take its shares")
        self.retired.add(worker)
        queued = []
        for share in self.held_by(worker):
            taker = min(others, key=lambda w: (len(self.held_by(w)) + self._coming(w), w))
            self.moving[share] = taker
            queued.append((share, taker))
        self.moving = {s: w for s, w in self.moving.items() if w != worker}
        self.version += 1
        return queued

    def unretire(self, worker: int) -> None:
        """A new worker takes a removed one's rank (``pslm ctl add-worker``)."""
        if worker in self.retired:
            self.retired.discard(worker)
            self.version += 1

    def _coming(self, worker: int) -> int:
        return sum(1 for w in self.moving.values() if w == worker)

    def rebalance(self, joiners: list[int]) -> list[tuple[int, int]]:
        """Find a share for each worker in ``joiners`` that holds none and awaits none; returns
        (share, joiner) pairs. Shares nobody holds go to them at once, all of them; otherwise
        a share of a worker holding two or more (its own first) moves once its holder
        releases it."""
        queued = []
        joiners = [j for j in joiners if j not in self.retired]
        idle = [j for j in joiners if not self.held_by(j) and j not in self.moving.values()]
        free = [s for s, w in enumerate(self.holders) if w == NOBODY]
        for i, share in enumerate(free if idle else []):  # nobody to release them
            self.holders[share] = idle[i % len(idle)]
            self.starts.pop(share, None)
            queued.append((share, self.holders[share]))
        for joiner in joiners:
            if self.held_by(joiner) or joiner in self.moving.values():
                continue
            spare = self._spare_for(joiner)
            if spare is not None:
                self.moving[spare] = joiner
                queued.append((spare, joiner))
        if queued:
            self.version += 1
        return queued

    def _spare_for(self, joiner: int) -> int | None:
        """A share that can move to ``joiner``: of a worker holding two or more, its own
        first, else one of the busiest holder's."""
        spare = [
            s
            for s, w in enumerate(self.holders)
            if s not in self.moving and len(self.held_by(w)) > 1
        ]
        if not spare:
            return None
        if joiner in spare:
            return joiner
        return max(spare, key=lambda s: (len(self.held_by(self.holders[s])), -s))

    def release(self, share: int, worker: int, clock: int) -> int:
        """``worker`` lets ``share`` go: it pushed it up to ``clock`` - 1. Returns the new
        holder, who pushes it from ``clock``. ValueError if the release does not fit."""
        if share in self.starts and self.starts[share] == clock and share not in self.moving:
            return self.holders[share]  # released already: the request again (idempotent)
        if not 0 <= share < len(self.holders) or self.holders[share] != worker:
            raise ValueError(f"worker {worker} does not hold share {share}")
        if share not in self.moving:
            raise ValueError(f"share {share} is not moving")
        if clock < 0:
            raise ValueError(f"clock must be >= 0, got {clock}")
        self.holders[share] = self.moving.pop(share)
        self.starts[share] = clock
        self.version += 1
        return self.holders[share]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ShareLeases:
        """What ``to_dict`` gave (a restarted scheduler's saved state)."""
        leases = cls(len(raw["holders"]))
        leases.holders = [int(w) for w in raw["holders"]]
        leases.starts = {int(s): int(c) for s, c in raw["starts"].items()}
        leases.moving = {int(s): int(w) for s, w in raw["moving"].items()}
        leases.retired = {int(w) for w in raw.get("retired", [])}
        leases.version = int(raw["version"])
        return leases

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "holders": list(self.holders),
            "starts": {str(s): c for s, c in self.starts.items()},
            "moving": {str(s): w for s, w in self.moving.items()},
            "retired": sorted(self.retired),
        }


class Leases(NamedTuple):
    """Who holds each share (``pslm.ps.control.leases``), as the scheduler sent it."""

    version: int
    holders: tuple[int, ...]
    """Share -> the worker holding it (-1: nobody)."""
    starts: dict[int, int]
    """Share -> the first clock its holder pushes it (shares that moved)."""
    moving: dict[int, int]
    """Share -> the worker it goes to once its holder releases it."""
    stop: bool = False
    """The cluster is shutting down."""
    retired: frozenset[int] = frozenset()
    """Workers removed from the job: they leave once their shares moved."""

    def mine(self, rank: int) -> list[int]:
        return [s for s, w in enumerate(self.holders) if w == rank]

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Leases:
        try:
            return cls(
                int(body["version"]),
                tuple(int(w) for w in body["holders"]),
                {int(s): int(c) for s, c in body["starts"].items()},
                {int(s): int(w) for s, w in body["moving"].items()},
                bool(body.get("stop", False)),
                frozenset(int(w) for w in body.get("retired", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed leases from the scheduler: {exc!r}") from None
