"""BSP's round (and local SGD's): a clock's update, once every share's push and every server's
part of the norm are in. Decisions only: no sockets, nothing sent.

    round = Round()
    round.add(share, push, arrived=time.monotonic())     # a share's push, complete
    if round.full(num_shares) and round.grads is None:
        grads, factor = store.reduce(round.ordered())    # the weighted sum, and 1 / weights
        round.reduced(grads, factor, shard, store.sq_norm(grads) * factor**2)
    decision = round.ready(num_servers=2, clip_norm=1.0)  # Reduced, Skipped, or None: not yet

The update for clock c is the weighted mean of the shares' gradients (summed in share order, so
runs repeat exactly), clipped by the global norm, one optimizer step; the version becomes
c + 1. Clipping is exact across shards: each server sends its part of the squared norm of the
mean gradient to every other (``norm`` notices) and all of them add the parts in server-rank
order, so every server computes the same factor ``torch.nn.utils.clip_grad_norm_`` would on the
whole model.

A clock is skipped (``Skipped``: the version advances, nothing else changes) when a push says
its gradient is not finite (``FINITE``), decided before anything is reduced, or when the
global norm is not: every server sees the same flags and the same norm, so every shard skips
the same clocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from pslm.ps.core.push import FINITE, NONFINITE_GRAD, NONFINITE_NORM
from pslm.ps.server.intake import PendingPush
from pslm.ps.server.shard import Grad, clip_coef


class Reduced(NamedTuple):
    """A round's decision: the update to apply."""

    grads: list[Grad]
    multiplier: float
    """``grads * multiplier`` is the clipped mean gradient."""


class Skipped(NamedTuple):
    """A round's decision: no update; the clock passes with the parameters as they are."""

    code: float
    """Why (``pslm.ps.core.push.SKIP_REASONS``)."""


@dataclass(slots=True)
class Round:
    """What a server gathers for the clock it is about to apply."""

    pushes: dict[int, tuple[float, list[Grad]]] = field(default_factory=dict)
    """Share -> (weight, gradients per chunk)."""
    grads: list[Grad] | None = None
    """The weighted sum of the pushes, once every share's is in."""
    factor: float = 1.0
    """grads * factor is the mean gradient."""
    norms: dict[int, float] = field(default_factory=dict)
    """Server -> its part of the squared norm of the mean gradient."""
    scalars: dict[int, dict[str, float]] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    """Share -> when its push was complete (how long it was held is counted from there)."""
    pushed_by: dict[int, int] = field(default_factory=dict)
    """Share -> the worker whose push of it was taken."""

    def add(self, share: int, push: PendingPush, arrived: float) -> None:
        """Count in ``share``'s complete push."""
        self.pushes[share] = (push.weight, push.complete_grads)
        self.scalars[share] = push.scalars
        self.arrived[share] = arrived
        self.pushed_by[share] = push.worker

    def full(self, num_shares: int) -> bool:
        """Every share's push is in."""
        return len(self.pushes) >= num_shares

    def ordered(self) -> list[tuple[float, list[Grad]]]:
        """The pushes in share order (the same sum every run)."""
        return [self.pushes[s] for s in sorted(self.pushes)]

    def reduced(self, grads: list[Grad], factor: float, shard: int, sq: float | None) -> None:
        """The pushes' weighted sum, and ``sq``: this shard's part of the squared norm of their
        mean when clipping needs it (the caller sends it to the other servers)."""
        self.grads, self.factor = grads, factor
        if sq is not None:
            self.norms[shard] = sq

    def flagged(self) -> bool:
        """A share's push said its gradient is not finite (the round is skipped whole)."""
        return any(s.get(FINITE, 1.0) < 1.0 for s in self.scalars.values())

    def ready(self, *, num_servers: int, clip_norm: float) -> Reduced | Skipped | None:
        """The decision, once every share's push is in: Skipped if one is flagged; else None
        until the pushes are reduced and, with clipping (``clip_norm`` > 0), every server's
        part of the norm is in; then the update with its multiplier, or Skipped if the global
        norm is not finite."""
        if self.flagged():
            return Skipped(NONFINITE_GRAD)
        if self.grads is None:
            return None
        multiplier = self.factor
        if clip_norm > 0:
            if any(s not in self.norms for s in range(num_servers)):
                return None
            total = sum(self.norms[s] for s in range(num_servers))
            if not math.isfinite(total):
                return Skipped(NONFINITE_NORM)
            multiplier *= clip_coef(total, clip_norm)
        return Reduced(self.grads, multiplier)

    def by(self, num_shares: int) -> list[int]:
        """Who pushed each share."""
        return [self.pushed_by[s] for s in range(num_shares)]

    def mean_scalars(self) -> dict[str, float]:
        """Each scalar's mean over the shares that sent it, weighted by their push weights, in
        share order (the same sum every run); names starting ``min.`` take the minimum."""
        sums: dict[str, list[float]] = {}
        least: dict[str, float] = {}
        for share in sorted(self.scalars):
            weight = self.pushes[share][0]
            for name, value in self.scalars[share].items():
                if name.startswith("min."):
                    least[name] = min(value, least.get(name, value))
                    continue
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += weight * value
                acc[1] += weight
        return {**{name: total / w for name, (total, w) in sums.items()}, **least}


@dataclass(slots=True)
class Norms:
    """Other servers' parts of the squared norm as they arrive: for the clock being gathered,
    or (from a faster peer) for the next one."""

    ahead: dict[int, float] = field(default_factory=dict)
    """Server -> its part for the version after this one."""

    def place(self, server: int, clock: int, version: int) -> str:
        """Where a part for ``clock`` goes when the server is at ``version``: ``now`` (the
        round's), ``ahead``, ``old`` (sent again after it was used) or ``dropped``."""
        if clock == version:
            return "now"
        if clock == version + 1:
            return "ahead"
        return "old" if clock < version else "dropped"

    def next_round(self) -> Round:
        """A new round, with the parts that came ahead for it."""
        fresh = Round(norms=self.ahead)
        self.ahead = {}
        return fresh
