"""A worker's model learning on its shares: gradients, and the pushes that carry them.

    learner = Learner(client, task, mirrors, batches, live)
    loss = learner.forward_backward(step, share)      # into the gradient buffers
    ts = learner.push_pull(mirrors.grads(), step, loss, share)   # returns at once
    learner.push(grads, step, share, loss)            # one share alone; blocks until taken
    grads, loss = learner.gradients(step, share)      # in new tensors

Every push carries the share's weight (its rows of the global batch), the loss and the live
settings this worker knows (``LiveSettings.scalars``), and with untied embeddings the rows it
touches (``ShareBatches.row_selection``). A push whose gradient is not finite says so
(``FINITE``): the servers skip that clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from pslm.ps.client.client import PSClient
from pslm.ps.core.push import FINITE
from pslm.train.batches import ShareBatches
from pslm.train.mirrors import HostMirrors
from pslm.train.steer import LiveSettings
from pslm.train.tasks import Task


class Learner:
    """Forward and backward passes on shares' batches, and their pushes."""

    def __init__(
        self,
        client: PSClient,
        task: Task,
        mirrors: HostMirrors,
        batches: ShareBatches,
        live: LiveSettings,
        poisoned: Callable[[int, int], bool] = lambda share, step: False,
    ):
        self.client = client
        self.poisoned = poisoned
        """Whether the test knob ``train.nan_grads`` makes a share's loss NaN at a step (by
        share, not by worker: whoever computes a share gets the same gradient)."""
        self.model = task.model
        self.params = mirrors.params
        self.mirrors = mirrors
        self.batches = batches
        self.live = live
        self.inputs = torch.zeros(0, dtype=torch.long)
        """The last forward-backward pass's inputs."""

    def forward_backward(self, step: int, share: int, slowdown: float = 0.0) -> float:
        """``share``'s loss at ``step``; its gradients in the model's buffers. ``slowdown``:
        an experiment's straggler idles that many times the compute it took."""
        start = time.perf_counter()
        batch = self.batches.batch(step, share)
        self.inputs = batch[0]
        self.model.zero_grad(set_to_none=False)
        _, loss = self.model(*batch)
        assert loss is not None
        loss = self.poison(loss, step, share)
        loss.backward()
        value = float(loss.item())
        if slowdown:
            time.sleep(slowdown * (time.perf_counter() - start))
        return value

    def gradients(self, step: int, share: int) -> tuple[dict[str, torch.Tensor], float]:
        """``share``'s gradients at ``step`` in new tensors (the gradient buffers may still be
        on their way to the servers), and its loss."""
        _, loss = self.model(*self.batches.batch(step, share))
        assert loss is not None
        loss = self.poison(loss, step, share)
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
        out = {
            n: (g if g is not None else torch.zeros_like(self.params[n])).detach().cpu()
            for n, g in zip(names, grads, strict=True)
        }
        return out, float(loss.item())

    def push(self, grads: dict[str, torch.Tensor], step: int, share: int, loss: float) -> None:
        """Push one share's gradients for ``step``; blocks until the servers have them."""
        x = self.batches.batch(step, share)[0]
        self.client.wait(
            self.client.push(
                grads,
                clock=step,
                weight=self.batches.weight(share),
                scalars=self.flagged(loss, grads),
                rows=self.batches.row_selection(step, x, share),
                share=share,
            )
        )

    def push_pull(self, grads: dict[str, torch.Tensor], clock: int, loss: float, share: int) -> int:
        """Push ``grads`` for ``clock`` and pull the parameters into the mirrors once the
        servers updated them. Returns at once: the timestamp to wait for."""
        return self.client.push_pull(
            grads,
            self.mirrors.host,
            clock=clock,
            weight=self.batches.weight(share),
            scalars=self.flagged(loss, grads),
            rows=self.batches.row_selection(clock, self.inputs),
            share=share,
        )

    def pull_all_rows(self, version: int, clock: int) -> None:
        """Bring every embedding row up to date (for evaluating and writing the model)."""
        name = self.batches.row_name
        assert name is not None
        out = {name: self.mirrors.host[name]}
        self.client.wait(self.client.pull(out, version=version, clock=clock))
        self.mirrors.load()

    def poison(self, loss: torch.Tensor, step: int, share: int) -> torch.Tensor:
        """``loss``, or NaN (and so every gradient) where ``train.nan_grads`` says."""
        return loss * math.nan if self.poisoned(share, step) else loss

    def flagged(self, loss: float, grads: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """What a push carries besides tensors: the loss (if finite), the live settings, and
        ``FINITE`` 0 when a gradient is not finite - which is then zeroed in place before it
        is pushed: the servers skip it anyway, and a NaN must not reach a lossy codec's error
        feedback (it would poison every later push) or int8 (which refuses it)."""
        out = {"loss": loss} if math.isfinite(loss) else {}
        if not finite(grads.values()):
            out[FINITE] = 0.0
            for g in grads.values():
                g.zero_()
        return {**out, **self.live.scalars()}


def finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite: one sum each, in float64 (which no sum
    of finite float32 values overflows), and one check of the sums."""
    sums = [t.sum(dtype=torch.float64) for t in tensors]
    return not sums or bool(torch.stack(sums).isfinite().all())
