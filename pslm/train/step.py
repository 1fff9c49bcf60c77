"""How a worker trains one step: one strategy per mode, chosen once when the run starts.

    strategy = SharesStep(learner, keeper, timer, record=records.build)   # or another
    timer.step_begins()
    stepped = strategy.run(step, shares, slowdown, due=evaluate or checkpoint)
    if stepped is not None:
        done, record = stepped      # the servers' answer, the step's line of metrics.jsonl

- ``SharesStep`` (BSP, SSP, ASP): forward and backward on every share held, then one
  push_pull; a dead worker's share taken over meanwhile is pushed while it waits.
- ``OverlapStep`` (``cluster.overlap``): pushes bucket by bucket during backward and waits
  module by module during the next forward pass, so a step's record comes during the next
  step (at once when an evaluation or a checkpoint is due).
- ``LocalStep`` (``local:H``): the worker's own optimizer steps; every H steps, and before an
  evaluation or a checkpoint, the servers average how far the workers moved.

The loop starts each step's clock; a strategy marks where its computing ends
(``StepTimer.compute_ends``) and makes the step's record with the ``record`` it was given.
"""

from __future__ import annotations

from typing import Any, Protocol

from pslm.ps.client.client import Completion

Stepped = tuple[Completion, dict[str, Any]]
"""A step done: what the servers said of it, and its record."""


class Step(Protocol):
    steerable: bool
    """Whether ``pslm ctl`` may change the consistency model and ask for checkpoints while
    this strategy runs (plain steps only)."""

    def run(self, step: int, shares: list[int], slowdown: float, *, due: bool) -> Stepped | None:
        """Train ``shares`` at ``step`` (``slowdown``: an experiment's straggler's extra
        compute, as a multiple). ``due``: an evaluation or a checkpoint follows, so the step
        must be complete. None when its record comes later."""
        ...
