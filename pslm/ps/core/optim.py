"""The optimizer the servers run, as settings: SGD (momentum, Nesterov), Adam and AdamW, with
learning-rate schedules. Torch-free: the scheduler and the config read it; the update rules
that carry it out are the server's (``pslm.ps.server.rules``).

    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1, clip_norm=1.0,
                          schedule=ScheduleConfig(kind="cosine", warmup_steps=100,
                                                  decay_steps=2000, min_lr=1e-4))
    cfg.lr_at(step)                 # the schedule's learning rate at ``step``
    OptimizerConfig.from_dict(cfg.to_dict()) == cfg
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pslm.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then constant or cosine decay.

    lr(step) = lr * (step + 1) / warmup_steps              while step < warmup_steps
             = lr                                          constant, after warmup
             = min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2
                   with r = (step - warmup_steps) / (decay_steps - warmup_steps)
                                                           cosine, up to decay_steps
             = min_lr                                      cosine, after decay_steps
    """

    kind: str = "constant"
    """``constant`` or ``cosine``."""
    warmup_steps: int = 0
    """Steps of linear warmup from lr/warmup_steps up to lr."""
    decay_steps: int = 0
    """Cosine only: the step at which the learning rate reaches ``min_lr``."""
    min_lr: float = 0.0
    """Cosine only: the final learning rate."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "cosine" and self.decay_steps <= self.warmup_steps:
            raise ConfigError(
                f"cosine decay_steps ({self.decay_steps}) must exceed warmup_steps "
                f"({self.warmup_steps})"
            )
        if not (self.min_lr >= 0 and math.isfinite(self.min_lr)):
            raise ConfigError(f"min_lr must be a finite number >= 0, got {self.min_lr}")

    def lr_at(self, lr: float, step: int) -> float:
        """The learning rate for the update made at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return lr
        if step >= self.decay_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        return self.min_lr + (lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """The update rule the servers run. Sent by the client at ``init``."""

    name: str = "adamw"
    """``sgd``, ``adam`` (L2 weight decay) or ``adamw`` (decoupled weight decay)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Applied only to tensors that take decay (by default those with >= 2 dimensions)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment coefficients."""
    eps: float = 1e-8
    """Adam/AdamW denominator term."""
    momentum: float = 0.0
    """SGD momentum."""
    dampening: float = 0.0
    """SGD dampening."""
    nesterov: bool = False
    """SGD Nesterov momentum (needs momentum > 0 and dampening 0)."""
    clip_norm: float = 0.0
    """Clip the global gradient norm to this value, as ``clip_grad_norm_``; 0 turns it off."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number >= 0, got {self.lr}")
        for name in ("weight_decay", "eps", "momentum", "dampening", "clip_norm"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must lie in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.dampening <= 1.0:
            raise ConfigError("momentum must lie in [0, 1) and dampening in [0, 1]")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("nesterov needs momentum > 0 and dampening 0")
        if self.clip_norm < 0:
            raise ConfigError(f"clip_norm must be >= 0 (0 = off), got {self.clip_norm}")
        if isinstance(self.schedule, dict):
            self.schedule = ScheduleConfig(**self.schedule)

    def lr_at(self, step: int) -> float:
        return self.schedule.lr_at(self.lr, step)

    def steered(self, settings: dict[str, float]) -> OptimizerConfig:
        """This configuration with live settings (``pslm ctl set``): ``lr`` scales the whole
        schedule (its ``min_lr`` too), ``clip_norm`` and ``weight_decay`` replace."""
        out = replace(self, **settings)  # type: ignore[arg-type]
        if "lr" in settings and self.lr > 0:
            min_lr = self.schedule.min_lr * settings["lr"] / self.lr
            out = replace(out, schedule=replace(self.schedule, min_lr=min_lr))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> OptimizerConfig:
        """Rebuild from ``to_dict`` output received from a peer; ConfigError if malformed."""
        if not isinstance(d, dict):
            raise ConfigError("optimizer config must be a map")
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise ConfigError(f"unknown optimizer settings: {sorted(unknown)}")
        sched = d.get("schedule", {})
        if not isinstance(sched, dict) or set(sched) - {f.name for f in fields(ScheduleConfig)}:
            raise ConfigError(f"malformed schedule: {sched!r}")
        try:
            kw = {k: _typed(cls, k, v) for k, v in d.items() if k != "schedule"}
            schedule = ScheduleConfig(**{k: _typed(ScheduleConfig, k, v) for k, v in sched.items()})
        except TypeError as exc:
            raise ConfigError(f"malformed optimizer config: {exc}") from None
        return cls(schedule=schedule, **kw)


_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "kind": str,
    "nesterov": bool,
    "warmup_steps": int,
    "decay_steps": int,
}


def _typed(cls: type, key: str, value: Any) -> Any:
    if key == "betas":
        if not (isinstance(value, list) and len(value) == 2 and all(_number(b) for b in value)):
            raise TypeError(f"betas must be two numbers, got {value!r}")
        return (float(value[0]), float(value[1]))
    want = _TYPES.get(key, (int, float))
    if isinstance(value, bool) and want is not bool:
        raise TypeError(f"{cls.__name__}.{key} must not be a boolean")
    if not isinstance(value, want):
        raise TypeError(f"{cls.__name__}.{key} has the wrong type: {value!r}")
    return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
