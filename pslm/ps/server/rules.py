"""The server's update rules: what an ``OptimizerConfig`` (``pslm.ps.core.optim``) does to a
shard's flat buffers.

    rule = build_rule(cfg)
    state = {name: torch.zeros(numel) for name in rule.state_names}   # beside the parameters
    rule.step(params, grads, state_views, steps, lr=cfg.lr_at(step),
              weight_decay=cfg.weight_decay)        # lists of chunk views

The rules call PyTorch's fused CPU kernels through ``torch.optim``'s functional API, so a
server computes what ``torch.optim.SGD/Adam/AdamW`` compute, about 10x faster than the default
per-tensor loop (DESIGN.md). State lives in flat buffers, one per kind (``exp_avg``,
``exp_avg_sq``, ``momentum_buffer``), aligned with the server's flat parameter buffer.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pslm.ps.core.optim import OptimizerConfig

Tensors = list[torch.Tensor]


class UpdateRule(Protocol):
    """What a server needs from an optimizer: state buffers and a step over chunk views."""

    state_names: tuple[str, ...]

    def step(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        state: dict[str, list[torch.Tensor]],
        steps: list[torch.Tensor],
        *,
        lr: float,
        weight_decay: float,
        grad_scale: torch.Tensor | None = None,
    ) -> None:
        """Update ``params`` in place from ``grads / grad_scale`` (aligned lists of 1-D fp32
        views); the kernels overwrite ``grads`` with the divided values. ``steps`` already
        count this update (1 on the first), as torch's optimizers count ``state["step"]``."""
        ...


class SGDRule:
    """SGD with optional momentum, dampening and Nesterov, as ``torch.optim.SGD``."""

    def __init__(self, cfg: OptimizerConfig):
        self.cfg = cfg
        self.state_names: tuple[str, ...] = ("momentum_buffer",) if cfg.momentum else ()

    def step(
        self,
        params: Tensors,
        grads: Tensors,
        state: dict[str, Tensors],
        steps: Tensors,
        *,
        lr: float,
        weight_decay: float,
        grad_scale: torch.Tensor | None = None,
    ) -> None:
        momentum = self.cfg.momentum
        # torch starts the momentum buffer as a copy of the first gradient (no dampening)
        first = bool(momentum) and bool(steps) and steps[0].item() == 1
        torch._fused_sgd_(  # what torch.optim.SGD(fused=True) runs, minus its per-call sorting
            params,
            grads,
            state["momentum_buffer"] if momentum else [],
            weight_decay=weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=self.cfg.dampening,
            nesterov=self.cfg.nesterov,
            maximize=False,
            is_first_step=first,
            grad_scale=grad_scale,
            found_inf=None,
        )


class AdamRule:
    """Adam (``decoupled=False``, L2 decay) or AdamW (``decoupled=True``), fused."""

    state_names: tuple[str, ...] = ("exp_avg", "exp_avg_sq")

    def __init__(self, cfg: OptimizerConfig, *, decoupled: bool):
        self.cfg = cfg
        self.decoupled = decoupled

    def step(
        self,
        params: Tensors,
        grads: Tensors,
        state: dict[str, Tensors],
        steps: Tensors,
        *,
        lr: float,
        weight_decay: float,
        grad_scale: torch.Tensor | None = None,
    ) -> None:
        # what torch.optim.Adam(W)(fused=True) runs (after counting the step), minus its
        # per-call sorting by device
        fused = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        fused(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=self.cfg.betas[0],
            beta2=self.cfg.betas[1],
            weight_decay=weight_decay,
            eps=self.cfg.eps,
            maximize=False,
            grad_scale=grad_scale,
            found_inf=None,
        )


def build_rule(cfg: OptimizerConfig) -> UpdateRule:
    """The update rule that ``cfg`` names."""
    if cfg.name == "sgd":
        return SGDRule(cfg)
    return AdamRule(cfg, decoupled=cfg.name == "adamw")
