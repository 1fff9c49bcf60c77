"""The one clock of a worker's run: where each step's time goes, and the time not training.

    timer = StepTimer()
    timer.run_begins(already=resumed_time)   # before the first step
    timer.step_begins()                      # before each step's forward pass
    compute_s = timer.compute_ends()         # gradients ready, the exchange begins
    comm_s = timer.comm_s()                  # the parameters back
    with timer.pause():                      # evaluating, checkpointing: not training
        ...
    with timer.exposed(step):                # overlap: blocked on step's exchange
        ...
    timer.hold(live.hold())                  # paused (pslm ctl pause): not training either

A step's ``compute_s`` runs from its beginning to the end of its computing (on a worker that
holds several shares, the pushes of all but the last share included), its ``comm_s`` from
there until the parameters are back. Under ``cluster.overlap`` a step's exchange runs during
its backward pass and the next step's forward pass: its ``comm_s`` is the time the worker was
blocked on it (``exposed``), which the computing of the step it fell in does not count.
``time`` counts from the beginning of the run (a resumed
run goes on from its checkpoint's), ``train_time`` leaves out the time paused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    """Marks of the step in progress, the run's start and the seconds paused so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0
        """Seconds spent evaluating, checkpointing and held (pslm ctl pause): not training."""
        self.held_s = 0.0
        """The last hold, for the next record."""
        self.began = self.start
        self.computed = self.start
        self.step_comm = 0.0
        """Seconds blocked on an exchange (``exposed``) since the step began, whichever
        step's exchange it was."""
        self.exposed_s: dict[int, float] = {}
        """Step -> seconds blocked on its exchange so far (overlap)."""

    def run_begins(self, already: float = 0.0) -> None:
        """The run's clock starts, at ``already`` seconds (a resumed run's time so far)."""
        self.start = time.perf_counter() - already

    def step_begins(self) -> None:
        self.began = time.perf_counter()
        self.step_comm = 0.0

    def since_step_began(self) -> float:
        return time.perf_counter() - self.began

    def compute_ends(self) -> float:
        """The step's computing is over: returns the seconds it took."""
        self.computed = time.perf_counter()
        return self.computed - self.began

    @property
    def compute_s(self) -> float:
        """The step's computing time, once it ended."""
        return self.computed - self.began

    def comm_s(self) -> float:
        """Seconds since the step's computing ended."""
        return time.perf_counter() - self.computed

    def now(self) -> tuple[float, float]:
        """(``time``, ``train_time``): seconds since the run began, all and training only."""
        now = time.perf_counter()
        return now - self.start, now - self.start - self.paused

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def train_elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @contextmanager
    def pause(self) -> Iterator[None]:
        """The time inside does not count as training."""
        began = time.perf_counter()
        yield
        self.paused += time.perf_counter() - began

    @contextmanager
    def exposed(self, step: int) -> Iterator[None]:
        """The time inside is spent sending ``step``'s pushes or blocked on its replies: that
        step's communication, and not the computing of the step in progress."""
        began = time.perf_counter()
        yield
        took = time.perf_counter() - began
        self.exposed_s[step] = self.exposed_s.get(step, 0.0) + took
        self.step_comm += took

    def take_exposed(self, step: int) -> float:
        """``step``'s exposed communication, once its exchange is complete."""
        return self.exposed_s.pop(step, 0.0)

    def hold(self, seconds: float) -> None:
        """The job was held ``seconds`` (pslm ctl pause): not training; the next record says."""
        self.held_s = seconds
        self.paused += seconds

    def take_held(self) -> dict[str, float]:
        """``{"paused_s": seconds}`` once after a hold, else nothing."""
        if not self.held_s:
            return {}
        held, self.held_s = self.held_s, 0.0
        return {"paused_s": round(held, 4)}
