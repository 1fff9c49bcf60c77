"""Hiding communication behind computation in the training loop (``cluster.overlap``).

    overlap = Overlap(model, client, bucket_bytes=1 << 20)
    logits, loss = model(x, y)            # waits for each module's new values as it reaches it
    previous = overlap.settle()           # the last step's exchange, complete (or None)
    overlap.start(step, weight)           # this step's exchange
    loss.backward()                       # gradient hooks push each bucket once it is final
    overlap.finish(scalars={"loss": v})   # pushes what is left; returns at once

Gradient hooks push bucket after bucket while backward runs (last layers first); forward
pre-hooks on every module that holds parameters wait, just before the module runs, for the
buckets holding them. So the pushes overlap backward, the servers' replies overlap the next
forward pass, and what cannot be hidden - the last bucket's trip and the servers' update -
is what the step waits for. The model knows nothing of this: the hooks are attached from
outside, as DDP attaches its own.

``comm_s`` of each exchange is its exposed communication: the time the worker spent sending
parts and blocked waiting for replies, on the critical path of a step. The run's
``StepTimer`` measures it (``exposed``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pslm.ps.client.client import Completion, PSClient
from pslm.ps.client.exchange import BucketPlan, Exchange
from pslm.train.timing import StepTimer


@dataclass(slots=True)
class _Open:
    exchange: Exchange
    step: int


class Overlap:
    """Gradient hooks that push, forward pre-hooks that wait, around one model."""

    def __init__(
        self,
        model: nn.Module,
        client: PSClient,
        params: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        *,
        bucket_bytes: int,
        timer: StepTimer,
    ):
        self.client = client
        self.timer = timer
        self.out = out
        names = {id(p): n for n, p in params.items()}
        self.plan = BucketPlan(client, list(reversed(list(params))), bucket_bytes)
        grads = {n: p.grad for n, p in params.items()}
        self.grads = {n: g for n, g in grads.items() if g is not None}
        assert len(self.grads) == len(grads), "give the parameters gradient buffers first"
        self.sizes = [len(b.names) for b in self.plan.buckets]
        self.left = list(self.sizes)
        self.incoming: _Open | None = None
        """The exchange whose new values the next forward pass waits for."""
        self.outgoing: _Open | None = None
        """The exchange this step's backward pushes into."""
        self.slowdown = 0.0
        """Experiments: extra compute time as a multiple of the real one (stragglers)."""
        self._mark = 0.0
        self.hooks: list[Any] = []
        for p in params.values():
            bucket = self.plan.bucket_of[names[id(p)]]
            self.hooks.append(p.register_post_accumulate_grad_hook(self._ready(bucket)))
        for module in model.modules():
            own = {self.plan.bucket_of[names[id(p)]] for p in module.parameters(recurse=False)}
            if own:
                self.hooks.append(module.register_forward_pre_hook(self._waits_for(sorted(own))))

    def begin_step(self, slowdown: float = 0.0) -> None:
        """A new step begins (its forward pass is next)."""
        self.slowdown = slowdown

    def start(
        self,
        step: int,
        weight: float,
        rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """Open this step's exchange, before backward."""
        assert self.incoming is None and self.outgoing is None, "settle the last step first"
        ex = Exchange(self.client, self.plan, clock=step, out=self.out, weight=weight, rows=rows)
        self.outgoing = _Open(ex, step)
        self.left = list(self.sizes)
        self._mark = time.perf_counter()

    def finish(self, scalars: Mapping[str, float]) -> None:
        """After backward: push what is left and end the push. Returns at once."""
        assert self.outgoing is not None
        self._straggle()
        with self.timer.exposed(self.outgoing.step):
            self.outgoing.exchange.finish(self.grads, scalars)
        self.incoming, self.outgoing = self.outgoing, None

    def settle(self) -> tuple[int, Completion, float] | None:
        """Wait for the rest of the last exchange: (its step, what the servers said, its
        exposed communication time), or None if there is none."""
        if self.incoming is None:
            return None
        step = self.incoming.step
        with self.timer.exposed(step):
            done = self.incoming.exchange.complete()
        self.incoming = None
        return step, done, self.timer.take_exposed(step)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def _ready(self, bucket: int) -> Any:
        def hook(_: torch.Tensor) -> None:
            if self.outgoing is None:  # a backward outside training steps
                return
            self.left[bucket] -= 1
            # the last bucket to be ready travels with finish(), in the same message
            if self.left[bucket] == 0 and sum(1 for n in self.left if n) > 0:
                self._straggle()
                with self.timer.exposed(self.outgoing.step):
                    self.outgoing.exchange.push(bucket, self.grads)

        return hook

    def _waits_for(self, buckets: list[int]) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self.incoming is None:
                return
            with self.timer.exposed(self.incoming.step):
                for b in buckets:
                    self.incoming.exchange.wait(b)

        return hook

    def _straggle(self) -> None:
        """A straggler computes slower: idle in proportion to the compute since the last
        mark, so that its pushes leave as late as a slower backward would send them."""
        now = time.perf_counter()
        if self.slowdown:
            time.sleep(self.slowdown * (now - self._mark))
        self._mark = time.perf_counter()
