"""The worker's training loop: pull -> forward/backward on its slice -> push, every step.

Run by each worker process of ``pslm train`` (``pslm run-worker pslm.train.worker:run``).
Under BSP one ``push_pull`` per step sends this worker's gradients and brings back the
parameters after the servers' update, together with the global batch's mean loss. Worker 0
also writes ``metrics.jsonl`` and the checkpoints; all workers share the evaluations.

The loop owns its parts, each in its own module: the step of the run's mode (``step``:
``SharesStep``, ``OverlapStep`` or ``LocalStep``), the clock and the records (``timing``,
``records``), the evaluations (``validator``), the checkpoints (``checkpointer``) and the
wire's tensors (``mirrors``). Between steps it follows the live settings (``pslm ctl``) and
the shares (a worker that died or joined).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pslm.errors import Diverged, RefusedError
from pslm.lm.data import PreparedData
from pslm.ps.client.client import Completion, PSClient
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.steering import Steering
from pslm.train.batches import ShareBatches
from pslm.train.checkpointer import Checkpointer
from pslm.train.config import TrainConfig
from pslm.train.learner import Learner
from pslm.train.local_sgd import LocalSGD
from pslm.train.local_step import LocalStep
from pslm.train.mirrors import HostMirrors
from pslm.train.overlap import Overlap
from pslm.train.overlap_step import OverlapStep
from pslm.train.records import MetricsLog, StepRecords, Trained
from pslm.train.shares import ShareKeeper
from pslm.train.shares_step import SharesStep
from pslm.train.steer import LiveSettings
from pslm.train.step import Step
from pslm.train.tasks import ClassifyData, load_data, make_task
from pslm.train.timing import StepTimer
from pslm.train.validator import Validator

log = logging.getLogger("pslm.worker")


def run(
    client: PSClient,
    *,
    config: dict[str, Any],
    run_dir: str,
    data_path: str,
    resume: dict[str, Any] | None = None,
) -> None:
    """Worker entry point (``function(client, **args)`` for the launcher). ``resume``: the
    checkpoint to continue from and where it stands (``step``, ``round``, ``time``)."""
    data = load_data(Path(data_path))
    TrainLoop(client, TrainConfig.from_dict(config), Path(run_dir), data, resume).run()


class TrainLoop:
    """One worker's run, from giving the servers the model (in the constructor) to the last
    step's record (``run``)."""

    def __init__(
        self,
        client: PSClient,
        cfg: TrainConfig,
        run_dir: Path,
        data: PreparedData | ClassifyData,
        resume: dict[str, Any] | None = None,
    ):
        self.client = client
        self.resume = resume or {}
        self.first_step = int(self.resume.get("step", 0))
        self.resumed_round = int(self.resume.get("round", 0))
        self.cfg = cfg
        self.device = torch.device(cfg.train.device)
        self.task = make_task(cfg, data, self.device)
        self.model = self.task.model
        self.params = dict(self.model.named_parameters())
        t = cfg.train
        self.keeper = ShareKeeper(client, follow=cfg.recovers_workers)
        start = self.resume.get("steering")
        self.live = LiveSettings(
            client, cfg.optim.optimizer(t.steps), Steering.from_dict(start) if start else None
        )
        # The run's model, or the one pslm ctl set before the checkpoint it resumes from.
        self.consistency = Consistency.parse(
            self.live.in_force.consistency or cfg.cluster.consistency
        )
        self.row_name = "transformer.wte.weight" if cfg.row_embeddings else None
        """The token embedding, when it travels by rows."""
        self.timer = StepTimer()
        tokens = t.batch_size * self.task.model_config.block_size
        self.records = StepRecords(client, self.keeper, self.timer, self.live, tokens=tokens)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", self.keeper)
        self.mirrors = self._init_parameters()
        self.batches = ShareBatches(
            self.task, self.keeper, batch_size=t.batch_size, steps=t.steps, row_name=self.row_name
        )
        self.learner = Learner(
            client,
            self.task,
            self.mirrors,
            self.batches,
            self.live,
            poisoned=t.poisoned,
        )
        self.validator = Validator(client, self.keeper, self.task, iters=t.eval_iters)
        self.checkpointer = Checkpointer(
            client,
            self.keeper,
            self.mirrors,
            run_dir=run_dir,
            train=t,
            live=self.live,
            task=self.task,
        )
        self.local: LocalSGD | None = None
        if self.consistency.kind == "local":
            period, round = self.consistency.period, self.resumed_round
            self.local = LocalSGD(self.mirrors, self.live, period=period, round=round)
        self.strategy = self._strategy()

    @property
    def round(self) -> int:
        """Local SGD's averagings so far (in other modes: as resumed)."""
        return self.local.round if self.local is not None else self.resumed_round

    def run(self) -> None:
        try:
            self._train()
        finally:
            self.metrics.close()

    def _strategy(self) -> Step:
        """The step of the run's mode, chosen once: local SGD, overlapped or plain."""
        if self.local is not None:
            return LocalStep(self.learner, self.local, self.timer, record=self.records.build)
        plain = SharesStep(self.learner, self.keeper, self.timer, record=self.records.build)
        if not self.cfg.cluster.overlap:
            return plain
        bucket_bytes = self.cfg.cluster.bucket_bytes
        overlap = Overlap(
            self.model,
            self.client,
            self.params,
            self.mirrors.host,
            bucket_bytes=bucket_bytes,
            timer=self.timer,
        )
        return OverlapStep(
            overlap,
            self.learner,
            self.timer,
            plain,
            record=self._settled_record,
            log=self._log_between_steps,
        )

    def _train(self) -> None:
        t = self.cfg.train
        self.timer.run_begins(float(self.resume.get("time", 0.0)))
        step = self.first_step
        held: list[int] = []
        while step < t.steps:
            shares = self.keeper.at_boundary(step)
            if not shares:  # late, or thought dead: wait for a share, then start where it does
                step = self._rejoin()
                held = list(self.keeper.mine)
                continue
            if self.row_name and set(shares) - set(held) and held:
                self.learner.pull_all_rows(step, step)  # a new share's batch reads other rows
            held = shares
            self._step(step, shares)
            step += 1

    def _step(self, step: int, shares: list[int]) -> None:
        """Train ``step``, then evaluate, checkpoint and log it when it is complete."""
        t = self.cfg.train
        self._seed(step)
        last = step == t.steps - 1
        evaluate = (step + 1) % t.eval_interval == 0 or last
        checkpoint = (step + 1) % t.checkpoint_interval == 0 or last
        slowdown = t.slowdown(self.client.rank, step, self.client.num_workers)
        self.timer.step_begins()
        stepped = self.strategy.run(step, shares, slowdown, due=evaluate or checkpoint)
        if stepped is not None:
            self._after_step(step, *stepped, evaluate, checkpoint, last)

    def _rejoin(self) -> int:
        """Wait for a share (a worker that joined late or lost its shares); pull the values
        of the clock it starts at and return that clock."""
        got, clock = self.keeper.await_share(self.cfg.cluster.timeout)
        if not got:  # the job ended before a share came
            return self.cfg.train.steps
        # a released share starts at its clock: the servers wait there for its push. Shares
        # nobody held (every worker had died) start where the servers stand
        done = self.client.wait(self.client.pull(self.mirrors.host, version=clock or 0))
        clock = done.version if clock is None else clock
        self.mirrors.load()
        log.info(
            "worker %d starts at step %d, shares %s", self.client.rank, clock, self.keeper.mine
        )
        return clock

    def _settled_record(self, trained: Trained) -> dict[str, Any]:
        """The record of an overlapped step once its exchange settled, with the hold before
        it and the live settings that came in force at it."""
        record = self.records.build(trained)
        record.update(self.timer.take_held())
        self._steer(trained.step, trained.done, record)
        return record

    def _log_between_steps(self, record: dict[str, Any]) -> None:
        """Log an overlapped step's record during the next step, then hold if paused (before
        anything of the next step is pushed)."""
        self.metrics.log(record)
        self.timer.hold(self.live.hold())

    def _fence(self, step: int, mode: Consistency) -> str:
        """The leader has the servers change the consistency model at a clock no worker has
        read at yet (pslm ctl set consistency): under BSP the one after the next, under SSP
        past the bound from its own (it has not pushed ``step`` + 1). Returns what happened."""
        if not self.strategy.steerable:
            return "the consistency model changes only between bsp, ssp and asp, without overlap"
        clock = step + 2 + (self.consistency.staleness if self.consistency.asynchronous else 0)
        try:
            self.client.fence(clock, mode)
        except RefusedError as exc:
            log.warning("the servers refused to change the consistency model: %s", exc)
            return f"refused: {exc}"
        return f"{mode} from step {clock}"

    def _new_mode(self, step: int, record: dict[str, Any]) -> None:
        """The servers changed the consistency model: this worker follows from the next step."""
        self.consistency = self.client.consistency
        follow = not self.consistency.asynchronous and self.strategy.steerable
        self.keeper.follow = follow
        self.client.report("shares_move", float(follow))
        record["consistency"] = {"model": str(self.consistency), "from_step": step + 1}
        log.info("consistency model %s from step %d", self.consistency, step + 1)

    def _steer(self, step: int, done: Completion, record: dict[str, Any]) -> bool:
        """Put in force the live settings every worker knew at this clock (from the next
        step); True if they ask for a checkpoint now."""
        doc = self.live.settle(done)
        if doc is None:
            return False
        record.update(self.live.record(doc, step + 1))
        wanted = Consistency.parse(doc.consistency) if doc.consistency else self.consistency
        if wanted != self.consistency and self.keeper.leader:
            record["steering"]["note"] = self._fence(step, wanted)
        if not self.live.checkpoint_asked():
            return False
        if self.consistency.asynchronous or not self.strategy.steerable:
            record["steering"]["note"] = "checkpoints on request need bsp without overlap"
            return False
        return True

    def _after_step(
        self,
        step: int,
        done: Completion,
        record: dict[str, Any],
        evaluate: bool,
        checkpoint: bool,
        last: bool,
    ) -> None:
        """Evaluate and checkpoint when due, then log the step. A worker whose shares went
        to others meanwhile (it was thought dead) does neither: it trains nothing now."""
        if self.client.consistency != self.consistency:
            self._new_mode(step, record)
        checkpoint = self._steer(step, done, record) or checkpoint
        record.update(self.timer.take_held())
        if not self.keeper.mine:
            evaluate = checkpoint = False
        with self.timer.pause():
            self._evaluate_and_checkpoint(step, done, record, evaluate, checkpoint, last)
        if last:  # every worker is done by now (the last evaluation met them all)
            record["end_time"] = round(self.timer.elapsed(), 4)
            record["end_train_time"] = round(self.timer.train_elapsed(), 4)
        self.metrics.log(record)
        self._stop_if_diverged(step)
        if not last:  # paused (pslm ctl pause) from the next step until resumed
            self.timer.hold(self.live.hold())

    def _stop_if_diverged(self, step: int) -> None:
        """Diverged once ``train.max_skips`` steps in a row were skipped (under BSP every
        worker sees the same skips and stops at the same step; under SSP/ASP and local SGD a
        worker counts its own, and the launcher ends the job when one stops)."""
        limit, skips = self.cfg.train.max_skips, self.records.skips_in_a_row
        if limit and skips >= limit:
            raise Diverged(
                f"{skips} steps in a row (the last: step {step} in metrics.jsonl) were "
                f"skipped because a gradient or the loss was not finite: the run diverged. "
                f"Lower the learning rate, or resume from a checkpoint before it "
                f"(train.max_skips = {limit})"
            )

    def _evaluate_and_checkpoint(
        self,
        step: int,
        done: Completion,
        record: dict[str, Any],
        evaluate: bool,
        checkpoint: bool,
        last: bool,
    ) -> None:
        """The due evaluation and checkpoint of ``step`` (``last``: the run's last step)."""
        if (evaluate or checkpoint) and self.row_name:
            # Every row, not only the next batch's.
            self.learner.pull_all_rows(done.version, step + 1)
        # Under SSP and ASP a barrier would undo the asynchrony, so worker 0 evaluates its own
        # view alone, except at the end, when every worker is done and the result counts the
        # same samples as under BSP.
        shared = last or not self.consistency.asynchronous
        if evaluate and (shared or self.keeper.leader):
            record["val_loss"] = round(self.validator.loss(step, shared=shared), 6)
            record["staleness_hist"] = self.records.staleness_hist()
        if checkpoint:
            self.checkpointer.save(
                step,
                done.version,
                record,
                asynchronous=self.consistency.asynchronous,
                round=self.round,
            )

    def _init_parameters(self) -> HostMirrors:
        """Give the servers worker 0's values, then keep parameters and gradients in tensors
        laid out for the wire (on a GPU: CPU mirrors of them, since the PS speaks CPU)."""
        cpu = {n: p.detach().cpu() for n, p in self.params.items()}
        # every worker now holds worker 0's values
        self.client.init(
            cpu,
            self.live.optimizer,
            consistency=self.consistency,
            push_codec=self.cfg.cluster.push_codec,
            pull_codec=self.cfg.cluster.pull_codec,
            rows=[self.row_name] if self.row_name else [],
            restore=str(self.resume.get("checkpoint", "")),
            clock=self.resumed_round if self.consistency.kind == "local" else self.first_step,
            shm=self.cfg.cluster.shm,
        )
        return HostMirrors.attach(self.client, self.params, cpu, self.device)

    def _seed(self, step: int) -> None:
        """Random numbers (dropout) from the seed, the step and the rank alone, so that a
        resumed run draws what the uninterrupted one drew."""
        w, r = self.client.num_workers, self.client.rank
        torch.manual_seed((self.cfg.train.seed * 1_000_003 + step) * w + r)
