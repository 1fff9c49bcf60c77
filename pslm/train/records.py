"""The lines of metrics.jsonl: one record per step, built here and written by the leader.

    records = StepRecords(client, keeper, timer, live, tokens=batch_size * block_size)
    record = records.build(Trained(step, done, loss, compute_s, comm_s))
    record["staleness_hist"] = records.staleness_hist()    # at an evaluation
    metrics = MetricsLog(run_dir / "metrics.jsonl", keeper)
    metrics.log(record)                                     # the leader appends it

A record says what the step cost (``time``, ``train_time``, ``compute_s``, ``comm_s`` from
the ``StepTimer``; ``wait_s``, bytes, staleness from the servers' ``Completion``) and what
changed since the last record: the holders of the shares (``leases``) and the shards a
backup took over (``failover``).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pslm.ps.client.client import Completion, PSClient
from pslm.ps.core.push import SKIPPED_PUSHES, skip_reason
from pslm.train.logfile import read_records
from pslm.train.shares import ShareKeeper
from pslm.train.steer import LiveSettings
from pslm.train.timing import StepTimer


@dataclass(frozen=True, slots=True)
class Trained:
    """A step, as its record tells it."""

    step: int
    done: Completion
    """What the servers said of its exchange."""
    loss: float
    """This worker's loss (the record shows the global batch's mean when the servers sent it)."""
    compute_s: float
    comm_s: float


class StepRecords:
    """Builds the records, keeping what they report as changes (staleness, leases, failover)."""

    def __init__(
        self,
        client: PSClient,
        keeper: ShareKeeper,
        timer: StepTimer,
        live: LiveSettings,
        *,
        tokens: int,
    ):
        self.client = client
        self.keeper = keeper
        self.timer = timer
        self.live = live
        self.tokens = tokens
        """Tokens in a global batch."""
        self.staleness_max = 0
        self.staleness_counts: dict[int, int] = {}
        """Reads by staleness since the last evaluation."""
        self.servers = list(client.servers)
        """Where each shard was served at the last record."""
        # The share holders as last recorded (a late worker records what it found).
        self.holders = [] if client.late else list(range(client.num_workers))
        self.skips_in_a_row = 0
        """Steps skipped one after the other up to the last record (0: it was applied)."""
        self.skipped_pushes = 0
        """SSP/ASP: the pushes of any worker the servers had skipped at the last record."""

    def build(self, trained: Trained) -> dict[str, Any]:
        """The record of a step."""
        done = trained.done
        time_s, train_s = self.timer.now()
        return {
            "step": trained.step,
            "time": round(time_s, 4),
            "train_time": round(train_s, 4),
            "loss": _loss(done.scalars.get("loss", trained.loss)),
            "lr": self.live.optimizer.lr_at(trained.step),
            "tokens_per_s": round(self.tokens / (trained.compute_s + trained.comm_s), 1),
            "compute_s": round(trained.compute_s, 5),
            "comm_s": round(trained.comm_s, 5),
            "wait_s": round(done.held_s, 5),
            "version": done.version,
            "staleness": done.staleness,
            "staleness_max": self._staleness(done.staleness),
            "bytes_pushed": done.bytes_sent,
            "bytes_pulled": done.bytes_received,
            "trained_by": list(done.trained_by),
            **self._lease_change(),
            **self._failover(),
            **self._skipped(done),
        }

    def _skipped(self, done: Completion) -> dict[str, Any]:
        """``{"skipped": why}`` when the servers skipped the step's update (a gradient was not
        finite), counting how many in a row (``skips_in_a_row``); under SSP/ASP, where each
        push is an update, ``skipped_pushes`` when the servers skipped other workers' pushes
        since the last record."""
        why = skip_reason(done.scalars)
        self.skips_in_a_row = self.skips_in_a_row + 1 if why else 0
        out: dict[str, Any] = {"skipped": why} if why else {}
        total = int(done.scalars.get(SKIPPED_PUSHES, self.skipped_pushes))
        if total > self.skipped_pushes:
            out[SKIPPED_PUSHES] = total
        self.skipped_pushes = max(total, self.skipped_pushes)
        return out

    def staleness_hist(self) -> dict[str, int]:
        """Reads by staleness since the last call (an evaluation's record shows them)."""
        hist = {str(k): v for k, v in sorted(self.staleness_counts.items())}
        self.staleness_counts = {}
        return hist

    def _staleness(self, seen: int) -> int:
        """The largest staleness this worker's reads have seen so far (and count it for the
        interval's histogram)."""
        self.staleness_max = max(self.staleness_max, seen)
        self.staleness_counts[seen] = self.staleness_counts.get(seen, 0) + 1
        return self.staleness_max

    def _lease_change(self) -> dict[str, Any]:
        """``{"leases": holders}`` when the holders of the shares changed since the last
        record (a worker died or rejoined), else nothing."""
        holders = list(self.keeper.leases.holders)
        if holders == self.holders:
            return {}
        self.holders = holders
        return {"leases": holders}

    def _failover(self) -> dict[str, Any]:
        """``{"failover": [shard, ...]}`` for the shards a backup took over since the last
        record (their server died), else nothing."""
        servers = list(self.client.servers)
        moved = [s for s, (a, b) in enumerate(zip(self.servers, servers, strict=True)) if a != b]
        self.servers = servers
        return {"failover": moved} if moved else {}


class MetricsLog:
    """metrics.jsonl, appended by the leader (the holder of share 0)."""

    def __init__(self, path: Path, keeper: ShareKeeper):
        self.path = path
        self.keeper = keeper
        self.file: TextIO | None = None
        self.logged = -1
        """The last step in the file."""
        self.recent: deque[dict[str, Any]] = deque(maxlen=1000)
        """Records, for a new leader."""

    def log(self, record: dict[str, Any]) -> None:
        """Keep the record; the leader appends it to the file, with the records a leader that
        died did not write."""
        self.recent.append(record)
        if not self.keeper.leader:
            # Share 0 went back to a restarted worker 0.
            self.close()
            return
        if self.file is None:
            self.file = self._open()
        for r in self.recent:
            if r["step"] > self.logged:
                self.file.write(json.dumps(r) + "\n")
                self.logged = r["step"]
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _open(self) -> TextIO:
        """The file, to append to after its last complete line."""
        records = read_records(self.path).records
        self.logged = records[-1]["step"] if records else -1
        f = self.path.open("a")
        if f.tell() and not self.path.read_bytes().endswith(b"\n"):
            f.write("\n")  # a leader died mid-line: the next record starts a line of its own
        return f


def _loss(value: float) -> float | None:
    """A loss as a record shows it: None when it is not finite (JSON has no NaN)."""
    return round(value, 6) if math.isfinite(value) else None
