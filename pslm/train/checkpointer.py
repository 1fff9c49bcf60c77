"""Checkpoints of a training run: a consistent cut, written whole or not at all.

    checkpointer = Checkpointer(client, keeper, mirrors, run_dir=run, ...)
    checkpointer.save(step, version, record, asynchronous=False, round=0)

The leader (the holder of share 0) writes the servers' shards and the model at one parameter
version into a hidden folder and publishes it under its step's name
(``pslm.lm.checkpoint.publish``); a failed checkpoint leaves nothing behind. Under BSP the
servers cannot move past ``version`` until the leader pushes again, so the leader writes
alone. Under SSP and ASP every worker stops at a barrier first, the leader pulls what the
servers hold then, writes, and a second barrier lets everyone go on.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from pslm.lm.checkpoint import publish, step_dir, write_model
from pslm.ps.client.client import PSClient
from pslm.train.config import TrainSection
from pslm.train.mirrors import HostMirrors
from pslm.train.shares import ShareKeeper
from pslm.train.steer import LiveSettings
from pslm.train.tasks import Task

log = logging.getLogger(__name__)


class Checkpointer:
    """Writes the run's checkpoints from the leader, with every worker's help under SSP/ASP."""

    def __init__(
        self,
        client: PSClient,
        keeper: ShareKeeper,
        mirrors: HostMirrors,
        *,
        run_dir: Path,
        train: TrainSection,
        live: LiveSettings,
        task: Task,
    ):
        self.client = client
        self.keeper = keeper
        self.mirrors = mirrors
        self.run_dir = run_dir
        self.train = train
        self.live = live
        self.task = task

    def save(
        self, step: int, version: int, record: dict[str, Any], *, asynchronous: bool, round: int
    ) -> None:
        """A checkpoint after ``step`` of the servers' state at ``version`` (under SSP/ASP:
        what they hold once every worker stopped), with ``record`` (the step's metrics line)
        and ``round`` (local SGD's averagings) in its meta."""
        if asynchronous:
            self.client.barrier(f"checkpoint-{step}")
            if self.keeper.leader:
                version = self.client.wait(
                    self.client.pull(self.mirrors.host, clock=step + 1)
                ).version
                self.mirrors.load()
                self._write_and_publish(step, version, record, round)
            self.client.barrier(f"checkpointed-{step}")
        elif self.keeper.leader:
            self._write_and_publish(step, version, record, round)

    def _write_and_publish(
        self, step: int, version: int, record: dict[str, Any], round: int
    ) -> None:
        final = step_dir(self.run_dir, step + 1)
        if not all(torch.isfinite(p).all() for p in self.task.model.parameters()):
            # a diverged model must not rotate the last healthy checkpoints out
            log.warning("no checkpoint at step %d: the parameters are not finite", step + 1)
            record["checkpoint"] = "skipped: the parameters are not finite"
            return
        tmp = final.with_name(f".tmp-{final.name}")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            self._write(tmp, step, version, record, round)
            publish(tmp, final, self.train.keep_checkpoints)
        except BaseException:
            # A failed checkpoint leaves nothing.
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write(
        self, tmp: Path, step: int, version: int, record: dict[str, Any], round: int
    ) -> None:
        self.client.save(str(tmp), version)
        meta = {
            "step": step + 1,
            "version": version,
            "seed": self.train.seed,
            "loss": record["loss"],
            "val_loss": record.get("val_loss"),
            "round": round,
            "time": record["time"],
            "optimizer": self.live.base.to_dict(),
            "steering": self.live.in_force.to_dict(),
            "workers": self.client.num_workers,
            "servers": self.client.num_servers,
            **self.task.meta(),
            # the step's metrics line, for a resume after a kill that came between the
            # checkpoint and the line
            "record": record,
        }
        write_model(tmp, self.task.model, meta)
