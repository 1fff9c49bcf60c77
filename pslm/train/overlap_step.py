"""The overlapped step (``cluster.overlap``): communication hidden behind computation.

    strategy = OverlapStep(overlap, learner, timer, plain, record=..., log=...)
    stepped = strategy.run(step, shares, slowdown, due=evaluate or checkpoint)

The forward pass waits, module by module, for the last step's new values; backward pushes
bucket by bucket (``Overlap``). So the last step's exchange settles during this step's forward
pass: its record is made then (``record``) and logged (``log``) before anything of this step
is pushed. A step due for an evaluation or a checkpoint settles at once and is returned. A
worker that trains another share than its own (a late worker given one) takes the ``plain``
step, once the last exchange settled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pslm.ps.client.client import Completion
from pslm.train.learner import Learner
from pslm.train.overlap import Overlap
from pslm.train.records import Trained
from pslm.train.step import Step, Stepped
from pslm.train.timing import StepTimer


class OverlapStep:
    """Overlapped steps of this worker's own share."""

    steerable = False

    def __init__(
        self,
        overlap: Overlap,
        learner: Learner,
        timer: StepTimer,
        plain: Step,
        *,
        record: Callable[[Trained], dict[str, Any]],
        log: Callable[[dict[str, Any]], None],
    ):
        self.overlap = overlap
        self.learner = learner
        self.batches = learner.batches
        self.rank = learner.client.rank
        self.timer = timer
        self.plain = plain
        self.record = record
        self.log = log
        self.computed: dict[int, tuple[float, float]] = {}
        """Steps not settled yet: their compute_s and loss."""

    def run(self, step: int, shares: list[int], slowdown: float, *, due: bool) -> Stepped | None:
        """None unless ``due``: the step is logged once its values came back, during the next
        step's forward pass."""
        if shares != [self.rank]:
            self._log_settled()
            return self.plain.run(step, shares, slowdown, due=due)
        self._compute(step, slowdown)
        if not due:
            return None
        settled = self.overlap.settle()
        assert settled is not None
        return settled[1], self._record(settled)

    def _compute(self, step: int, slowdown: float) -> None:
        """Forward (waiting per module for the last step's values), backward (pushing per
        bucket), and the rest of the push."""
        overlap = self.overlap
        overlap.begin_step(slowdown)
        batch = self.batches.batch(step, self.rank)
        model = self.learner.model
        _, loss_t = model(*batch)
        assert loss_t is not None
        loss_t = self.learner.poison(loss_t, step, self.rank)
        if slowdown:
            # An experiment's straggler: its forward pass takes longer too.
            time.sleep(slowdown * (self.timer.since_step_began() - self.timer.step_comm))
        self._log_settled()
        model.zero_grad(set_to_none=False)
        rows = self.batches.row_selection(step, batch[0])
        overlap.start(step, self.batches.weight(self.rank), rows)
        loss_t.backward()
        loss = float(loss_t.item())
        self.computed[step] = (self.timer.compute_ends() - self.timer.step_comm, loss)
        overlap.finish(self.learner.flagged(loss, self.learner.mirrors.grads()))

    def _log_settled(self) -> None:
        """Wait for the last step's exchange, if one is open, and log its record."""
        settled = self.overlap.settle()
        if settled is not None:
            self.log(self._record(settled))

    def _record(self, settled: tuple[int, Completion, float]) -> dict[str, Any]:
        step, done, comm = settled
        compute, loss = self.computed.pop(step)
        return self.record(Trained(step, done, loss, compute, comm))
