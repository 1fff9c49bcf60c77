"""Local SGD (consistency ``local:H``): a worker steps its own optimizer and, every H steps,
the servers average how far the workers moved.

    local = LocalSGD(mirrors, live, period=H, round=0)
    local.step(step)                       # after backward: this worker's own update
    if local.due(step):
        done = exchange(local.deltas(), clock=local.round)   # push the moves, pull the average
        local.averaged()                   # the next round moves from the averaged values

The worker's optimizer is the run's (``live.optimizer``, with the settings in force), with the
same groups as the servers': weight decay on the matrices, none on the rest. The servers'
clock under local SGD is the round, the number of averagings so far.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pslm.ps.core.optim import OptimizerConfig
from pslm.train.mirrors import HostMirrors
from pslm.train.steer import LiveSettings


class LocalSGD:
    """A worker's own optimizer, and the parameters at the last averaging (``anchor``)."""

    def __init__(self, mirrors: HostMirrors, live: LiveSettings, *, period: int, round: int):
        self.mirrors = mirrors
        self.params = mirrors.params
        self.live = live
        self.period = period
        self.round = round
        """Averagings so far (the servers' clock)."""
        # Gradient buffers exist from the start: the deltas are written into them.
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.optimizer = torch_optimizer(self.params, live.optimizer)
        self.anchor = self._values()

    def step(self, step: int) -> None:
        """One step of this worker's own optimizer, at ``step``'s learning rate."""
        o = self.live.optimizer
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), o.clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr_at(step)
        self.optimizer.step()

    def due(self, step: int) -> bool:
        """Whether the period ends with ``step``."""
        return (step + 1) % self.period == 0

    def deltas(self) -> dict[str, torch.Tensor]:
        """How far local steps moved the parameters since the last averaging, in the gradient
        buffers (which are laid out for the wire)."""
        with torch.no_grad():
            for n, p in self.params.items():
                assert p.grad is not None
                torch.sub(p, self.anchor[n], out=p.grad)
        return self.mirrors.grads()

    def averaged(self) -> None:
        """The servers' average came back into the model: a new round moves from there."""
        self.round += 1
        self.anchor = self._values()

    def _values(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}


def torch_optimizer(
    params: Mapping[str, torch.Tensor], o: OptimizerConfig
) -> torch.optim.Optimizer:
    """The run's optimizer on a worker, with the servers' groups."""
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, dampening=o.dampening, nesterov=o.nesterov
        )
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=o.betas, eps=o.eps)
