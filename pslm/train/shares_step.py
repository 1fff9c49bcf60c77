"""The plain step (BSP, SSP, ASP): gradients of every share held, then one push_pull.

    strategy = SharesStep(learner, keeper, timer, record=records.build)
    done, record = strategy.run(step, shares, slowdown, due=False)

A worker holds its own share unless a worker died (``ShareKeeper``). The shares before the
last are pushed on their own, each acknowledged before the gradient buffers are reused; the
last one goes with push_pull, which brings back the parameters after the servers' update. A
dead worker's share given to this worker meanwhile is computed and pushed while the reply is
awaited (the parameters are still those of ``step``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pslm.errors import Interrupted
from pslm.ps.client.client import Completion
from pslm.train.learner import Learner
from pslm.train.records import Trained
from pslm.train.shares import ShareKeeper
from pslm.train.step import Stepped
from pslm.train.timing import StepTimer


class SharesStep:
    """One step of the shares this worker holds, exchanged with push_pull."""

    steerable = True

    def __init__(
        self,
        learner: Learner,
        keeper: ShareKeeper,
        timer: StepTimer,
        *,
        record: Callable[[Trained], dict[str, Any]],
    ):
        self.learner = learner
        self.client = learner.client
        self.mirrors = learner.mirrors
        self.keeper = keeper
        self.timer = timer
        self.record = record

    def run(self, step: int, shares: list[int], slowdown: float, *, due: bool) -> Stepped:
        """Train and exchange ``step``; blocks until the parameters are back."""
        loss = self._compute(step, shares, slowdown)
        ts = self.learner.push_pull(self.mirrors.grads(), step, loss, shares[-1])
        done = self._wait(ts, step, shares)
        self.mirrors.load()
        trained = Trained(step, done, loss, self.timer.compute_s, self.timer.comm_s())
        return done, self.record(trained)

    def _compute(self, step: int, shares: list[int], slowdown: float) -> float:
        """Gradients of every share, all but the last pushed; the last share's loss."""
        for share in shares[:-1]:
            loss = self.learner.forward_backward(step, share, slowdown)
            self.learner.push(self.mirrors.grads(), step, share, loss)
        loss = self.learner.forward_backward(step, shares[-1], slowdown)
        self.timer.compute_ends()
        return loss

    def _wait(self, ts: int, step: int, shares: list[int]) -> Completion:
        """Wait for the exchange, pushing the shares taken over meanwhile."""
        pushed = list(shares)
        while True:
            try:
                return self.client.wait(ts, interrupt=self.keeper.changed)
            except Interrupted:
                self._take_over(step, pushed)

    def _take_over(self, step: int, pushed: list[int]) -> None:
        """Push ``step`` for the shares given to this worker that are not in ``pushed``."""
        orphans = self.keeper.taken_over(pushed)
        if orphans and self.learner.batches.row_name:
            # The servers wait at ``step``: its rows.
            self.learner.pull_all_rows(step, step)
        for orphan in orphans:
            grads, loss = self.learner.gradients(step, orphan)
            self.learner.push(grads, step, orphan, loss)
            pushed.append(orphan)
