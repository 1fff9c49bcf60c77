"""The training loop's side of live settings (``pslm ctl``; the protocol is in
``pslm.ps.core.steering``).

    live = LiveSettings(client, optimizer, start=None)
    client.push_pull(..., scalars={"loss": loss, **live.scalars()})
    new = live.settle(done)          # a version that comes in force from the next step
    live.optimizer.lr_at(step)       # the run's optimizer with the live settings applied
    waited = live.hold()             # paused: wait until resumed
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pslm.errors import ClusterError
from pslm.ps.client.client import Completion, PSClient
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.core.steering import KNOWN, Steering

log = logging.getLogger("pslm.worker")

POLL = 0.02
"""Seconds between looks at the scheduler's news while paused."""


class LiveSettings:
    """Which version of the live settings is in force on this worker."""

    def __init__(self, client: PSClient, optimizer: OptimizerConfig, start: Steering | None):
        self.client = client
        self.base = optimizer
        self.in_force = start or Steering()
        self.optimizer = self._apply(self.in_force)
        self.checkpoints_done = self.in_force.checkpoints

    def scalars(self) -> dict[str, float]:
        """What every push carries (nothing while no live setting was ever made)."""
        known = self.client.steering().version
        if known == 0 and self.in_force.version == 0:
            return {}
        return self.in_force.push_scalars(known)

    def settle(self, done: Completion) -> Steering | None:
        """The version every worker knew at the clock ``done`` completes (under SSP/ASP: this
        worker), if newer than the one in force: it comes in force from the next step."""
        agreed = done.scalars.get(KNOWN)
        if agreed is None or int(agreed) <= self.in_force.version:
            return None
        newest = self.client.steering()
        doc = newest if newest.version == int(agreed) else self.client.steering(int(agreed))
        self.in_force = doc
        self.optimizer = self._apply(doc)
        log.info("live settings version %d in force: %s", doc.version, doc.what)
        return doc

    def checkpoint_asked(self) -> bool:
        """Whether the version in force asks for a checkpoint not written yet (once each)."""
        if self.in_force.checkpoints <= self.checkpoints_done:
            return False
        self.checkpoints_done = self.in_force.checkpoints
        return True

    def hold(self) -> float:
        """While the version in force pauses the job, wait until the scheduler's newest
        version resumes it; returns the seconds waited. ClusterError if the cluster stops."""
        if not self.in_force.paused:
            return 0.0
        start = time.perf_counter()
        beat = self.client.heartbeat
        while True:
            newest = self.client.steering()
            if newest.version > self.in_force.version and not newest.paused:
                return time.perf_counter() - start
            if beat.stop_requested.is_set() or beat.lost.is_set():
                raise ClusterError("the cluster stopped while paused")
            time.sleep(POLL)

    def record(self, doc: Steering, step: int) -> dict[str, Any]:
        """What metrics.jsonl says of a version that came in force from ``step``."""
        return {
            "steering": {
                "version": doc.version,
                "what": doc.what,
                "from_step": step,
                "paused": doc.paused,
                **doc.overrides(),
            }
        }

    def _apply(self, doc: Steering) -> OptimizerConfig:
        optimizer = self.base.steered(doc.overrides())
        self.client.set_clipping(optimizer.clip_norm > 0)
        return optimizer
