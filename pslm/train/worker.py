"""The worker's training loop: pull -> forward/backward on its slice -> push, every step.

Run by each worker process of ``pslm train`` (``pslm run-worker pslm.train.worker:run``).
Under BSP one ``push_pull`` per step sends this worker's gradients and brings back the
parameters after the servers' update, together with the global batch's mean loss. Worker 0
also writes ``metrics.jsonl`` and the checkpoints; all workers share the evaluations.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from pslm.errors import Interrupted, RefusedError
from pslm.lm.data import PreparedData
from pslm.ps.client.client import Completion, PSClient
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.core.steering import Steering
from pslm.train.batches import ShareBatches
from pslm.train.checkpointer import Checkpointer
from pslm.train.config import TrainConfig
from pslm.train.learner import Learner
from pslm.train.local_sgd import LocalSGD
from pslm.train.mirrors import HostMirrors
from pslm.train.overlap import Overlap
from pslm.train.records import MetricsLog, StepRecords, Trained
from pslm.train.shares import ShareKeeper
from pslm.train.steer import LiveSettings
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
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = torch.device(cfg.train.device)
        self.task = make_task(cfg, data, self.device)
        self.model = self.task.model
        self.model_config = self.task.model_config
        t = cfg.train
        self.keeper = ShareKeeper(client, follow=cfg.recovers_workers)
        start = self.resume.get("steering")
        self.live = LiveSettings(
            client, cfg.optim.optimizer(t.steps), Steering.from_dict(start) if start else None
        )
        # the run's model, or the one pslm ctl set before the checkpoint it resumes from
        self.consistency = Consistency.parse(
            self.live.in_force.consistency or cfg.cluster.consistency
        )
        self.local: LocalSGD | None = None
        self.overlap: Overlap | None = None
        self.computed: dict[int, tuple[float, float]] = {}  # overlap: step -> compute_s, loss
        self.row_name = "transformer.wte.weight" if cfg.row_embeddings else None
        """The token embedding, when it travels by rows."""
        self.resumed_round = int(self.resume.get("round", 0))
        self.params = dict(self.model.named_parameters())
        self.timer = StepTimer()
        tokens = t.batch_size * self.model_config.block_size
        self.records = StepRecords(client, self.keeper, self.timer, self.live, tokens=tokens)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", self.keeper)
        self.mirrors = self._init_parameters()
        self.batches = ShareBatches(
            self.task, self.keeper, batch_size=t.batch_size, steps=t.steps, row_name=self.row_name
        )
        self.learner = Learner(client, self.task, self.mirrors, self.batches, self.live)
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

    @property
    def round(self) -> int:
        """Local SGD's averagings so far (in other modes: as resumed)."""
        return self.local.round if self.local is not None else self.resumed_round

    @property
    def optimizer(self) -> OptimizerConfig:
        """The run's optimizer with the live settings in force (``pslm ctl set``)."""
        return self.live.optimizer

    def run(self) -> None:
        try:
            self._train()
        finally:
            self.metrics.close()

    def _train(self) -> None:
        steps = self.cfg.train.steps
        self.timer.run_begins(float(self.resume.get("time", 0.0)))
        t = self.cfg.train
        step = self.first_step
        held: list[int] = []
        while step < steps:
            shares = self.keeper.at_boundary(step)
            if not shares:  # late, or thought dead: wait for a share, then start where it does
                step = self._rejoin()
                held = list(self.keeper.mine)
                continue
            if self.row_name and set(shares) - set(held) and held:
                self.learner.pull_all_rows(step, step)  # a new share's batch reads other rows
            held = shares
            self._seed(step)
            last = step == steps - 1
            evaluate = (step + 1) % t.eval_interval == 0 or last
            checkpoint = (step + 1) % t.checkpoint_interval == 0 or last
            extra = t.slowdown(self.client.rank, step, self.client.num_workers)
            self.timer.step_begins()
            if self.overlap is not None and shares == [self.client.rank]:
                done, record = self._overlapped_step(step, extra, evaluate or checkpoint)
                step += 1
                if not record:
                    continue  # its values come back during the next forward pass
            else:
                if self.overlap is not None:
                    self._log_settled(self.overlap.settle())
                if self.local is None:
                    loss, done = self._train_shares(step, shares, extra)
                else:  # local SGD: own steps; every H (and before evaluating) average changes
                    loss = self.learner.forward_backward(step, shares[0], extra)
                    self.timer.compute_ends()
                    self.local.step(step)
                    if self.local.due(step) or evaluate or checkpoint:
                        ts = self.learner.push_pull(
                            self.local.deltas(), self.local.round, loss, shares[0]
                        )
                        done = self.client.wait(ts)
                        self.mirrors.load()
                        self.local.averaged()
                    else:
                        done = Completion(self.local.round, {"loss": loss}, 0.0, 0, 0)
                trained = Trained(step, done, loss, self.timer.compute_s, self.timer.comm_s())
                record = self.records.build(trained)
                step += 1
            self._after_step(step - 1, done, record, evaluate, checkpoint, last)

    def _train_shares(self, step: int, shares: list[int], extra: float) -> tuple[float, Completion]:
        """Train every share this worker holds for ``step`` and exchange: the shares before the
        last are pushed on their own (acknowledged before the gradients are reused), the last
        one with push_pull. A dead worker's share given to this worker meanwhile is computed
        and pushed while the reply is awaited (the parameters are still those of ``step``).
        Returns (loss of the last share, completion); the computing ends before the last
        exchange."""
        for share in shares[:-1]:
            loss = self.learner.forward_backward(step, share, extra)
            self.learner.push(self.mirrors.grads(), step, share, loss)
        share = shares[-1]
        loss = self.learner.forward_backward(step, share, extra)
        self.timer.compute_ends()
        ts = self.learner.push_pull(self.mirrors.grads(), step, loss, share)
        pushed = list(shares)
        while True:
            try:
                done = self.client.wait(ts, interrupt=self.keeper.changed)
                break
            except Interrupted:
                orphans = self.keeper.taken_over(pushed)
                if orphans and self.row_name:  # the servers wait at ``step``: its rows
                    self.learner.pull_all_rows(step, step)
                for orphan in orphans:
                    grads, orphan_loss = self.learner.gradients(step, orphan)
                    self.learner.push(grads, step, orphan, orphan_loss)
                    pushed.append(orphan)
        self.mirrors.load()
        return loss, done

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

    def _overlapped_step(
        self, step: int, extra: float, due: bool
    ) -> tuple[Completion, dict[str, Any]]:
        """One step with overlap: forward (waiting per module for the last step's values),
        backward (pushing per bucket). Returns this step's completion and record when it is
        ``due`` for an evaluation or a checkpoint, else an empty record: the step is logged
        once its values have come back, during the next step's forward pass."""
        assert self.overlap is not None
        overlap = self.overlap
        overlap.begin_step(extra)
        share = self.client.rank
        batch = self.batches.batch(step, share)
        x = batch[0]
        _, loss_t = self.model(*batch)
        assert loss_t is not None
        if extra:  # an experiment's straggler: its forward pass takes longer too
            time.sleep(extra * (self.timer.since_step_began() - overlap.step_comm))
        self._log_settled(overlap.settle())
        self.model.zero_grad(set_to_none=False)
        overlap.start(step, self.batches.weight(share), self.batches.row_selection(step, x))
        loss_t.backward()
        loss = float(loss_t.item())
        self.computed[step] = (self.timer.compute_ends() - overlap.step_comm, loss)
        overlap.finish(self.learner.scalars(loss))
        if not due:
            return Completion(0, {}, 0.0, 0, 0), {}
        settled = overlap.settle()
        assert settled is not None
        return settled[1], self._settled_record(settled)

    def _log_settled(self, settled: tuple[int, Completion, float] | None) -> None:
        if settled is not None:
            self.metrics.log(self._settled_record(settled))
            # Before anything of the next step is pushed.
            self.timer.hold(self.live.hold())

    def _settled_record(self, settled: tuple[int, Completion, float]) -> dict[str, Any]:
        step, done, comm = settled
        compute, loss = self.computed.pop(step)
        record = self.records.build(Trained(step, done, loss, compute, comm))
        record.update(self.timer.take_held())
        self._steer(step, done, record)
        return record

    def _fence(self, step: int, mode: Consistency) -> str:
        """The leader has the servers change the consistency model at a clock no worker has
        read at yet (pslm ctl set consistency): under BSP the one after the next, under SSP
        past the bound from its own (it has not pushed ``step`` + 1). Returns what happened."""
        if self.overlap is not None or self.local is not None:
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
        follow = not self.consistency.asynchronous and self.overlap is None
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
        if self.consistency.asynchronous or self.local is not None or self.overlap is not None:
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
        if not last:  # paused (pslm ctl pause) from the next step until resumed
            self.timer.hold(self.live.hold())

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
            self.optimizer,
            consistency=self.consistency,
            push_codec=self.cfg.cluster.push_codec,
            pull_codec=self.cfg.cluster.pull_codec,
            rows=[self.row_name] if self.row_name else [],
            restore=str(self.resume.get("checkpoint", "")),
            clock=self.resumed_round if self.consistency.kind == "local" else self.first_step,
            shm=self.cfg.cluster.shm,
        )
        mirrors = HostMirrors.attach(self.client, self.params, cpu, self.device)
        if self.cfg.cluster.overlap and self.consistency.kind != "local":
            self.overlap = Overlap(
                self.model,
                self.client,
                self.params,
                mirrors.host,
                bucket_bytes=self.cfg.cluster.bucket_bytes,
            )
        if self.consistency.kind == "local":
            period, round = self.consistency.period, self.resumed_round
            self.local = LocalSGD(mirrors, self.live, period=period, round=round)
        return mirrors

    def _seed(self, step: int) -> None:
        """Random numbers (dropout) from the seed, the step and the rank alone, so that a
        resumed run draws what the uninterrupted one drew."""
        w, r = self.client.num_workers, self.client.rank
        torch.manual_seed((self.cfg.train.seed * 1_000_003 + step) * w + r)
