"""The local SGD step (``local:H``): the worker's own update, averaged every H steps.

    strategy = LocalStep(learner, local, timer, record=records.build)
    done, record = strategy.run(step, shares, slowdown, due=evaluate or checkpoint)

Each worker trains its own share with its own optimizer (``LocalSGD``). At the end of every
period, and before an evaluation or a checkpoint, it pushes how far it moved since the last
averaging and pulls the servers' average; between averagings nothing travels, and the record
shows this worker's loss. A step whose gradient is not finite is skipped by this worker alone
(its optimizer does not step) and recorded so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pslm.ps.client.client import Completion
from pslm.ps.core.push import NONFINITE_GRAD, SKIPPED
from pslm.train.learner import Learner, finite
from pslm.train.local_sgd import LocalSGD
from pslm.train.records import Trained
from pslm.train.step import Stepped
from pslm.train.timing import StepTimer


class LocalStep:
    """One local SGD step; an averaging when the period ends or the step is due."""

    steerable = False

    def __init__(
        self,
        learner: Learner,
        local: LocalSGD,
        timer: StepTimer,
        *,
        record: Callable[[Trained], dict[str, Any]],
    ):
        self.learner = learner
        self.local = local
        self.timer = timer
        self.record = record

    def run(self, step: int, shares: list[int], slowdown: float, *, due: bool) -> Stepped:
        share = shares[0]
        loss = self.learner.forward_backward(step, share, slowdown)
        self.timer.compute_ends()
        # (on the device, where the gradients are: local steps copy nothing to the host)
        grads = (p.grad for p in self.learner.params.values() if p.grad is not None)
        skipped = not finite(grads)
        if not skipped:  # else this worker's own step is skipped, as AMP's grad scaler does
            self.local.step(step)
        if self.local.due(step) or due:
            done = self._average(loss, share)
        else:
            done = Completion(self.local.round, {"loss": loss}, 0.0, 0, 0)
        if skipped:
            done = done._replace(scalars={**done.scalars, SKIPPED: NONFINITE_GRAD})
        trained = Trained(step, done, loss, self.timer.compute_s, self.timer.comm_s())
        return done, self.record(trained)

    def _average(self, loss: float, share: int) -> Completion:
        """Push the moves of this round and load the servers' average."""
        ts = self.learner.push_pull(self.local.deltas(), self.local.round, loss, share)
        done = self.learner.client.wait(ts)
        self.learner.mirrors.load()
        self.local.averaged()
        return done
