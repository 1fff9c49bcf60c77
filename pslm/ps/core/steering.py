"""Live control of a running job: the settings ``pslm ctl`` changes, and how a change takes
effect at one clock on every worker and server.

    doc = Steering()                                  # held by the scheduler
    doc = doc.change("set", {"lr": 3e-4})             # a new version; ConfigError if invalid
    doc = doc.change("pause", {})
    doc.to_dict() / Steering.from_dict(d)             # heartbeat replies, state files

The scheduler keeps the versions (``SteeringLog``) and sends the newest with every heartbeat
reply. Workers do not act on what their heartbeat brought, which arrives at different steps
on each: every push carries, as reduced scalars (``pslm.ps.server.loop``: names starting ``min.``
are reduced by their minimum), the newest version the worker knows (``min.ctl_known``) and
the settings of the version in force (``min.ctl``, ``min.lr``, ...). Under BSP the servers'
replies for clock c carry the minimum of the known versions, the same for every worker: the
version every worker has seen, which all of them put in force from clock c + 1 - pausing
before it, checkpointing after it, and pushing its settings with it, which the servers apply
to that clock's update. Under SSP and ASP a worker's reply reflects its own push alone, so
each worker acts on a change at its own next step, and servers apply the newest settings
they were sent. A new consistency model is not a setting a push can carry: the leading
worker has the servers fence a clock for it (the servers' ``fence``), and their replies at
that clock move every worker over.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pslm.errors import ConfigError
from pslm.ps.core.consistency import Consistency

SETTINGS = {"lr": "lr", "clip": "clip_norm", "weight_decay": "weight_decay"}
"""What ``set`` may change -> the optimizer field it overrides."""
ACTIONS = ("set", "pause", "resume", "checkpoint")
"""Changes of settings (``remove-worker`` and ``add-worker`` change membership: the
scheduler's ``pslm.ps.control.leases``)."""
KNOWN = "min.ctl_known"
IN_FORCE = "min.ctl"


@dataclass(frozen=True, slots=True)
class Steering:
    """One version of the job's live settings (None: the run's configuration stands)."""

    version: int = 0
    lr: float | None = None
    clip: float | None = None
    weight_decay: float | None = None
    consistency: str = ""
    """The consistency model asked for ("": the run's own); the servers switch at a clock
    the leading worker sets (``pslm.ps.server.loop``'s fence)."""
    paused: bool = False
    checkpoints: int = 0
    """Checkpoints asked for so far (each one is written once, at the clock it takes effect)."""
    changed_at: float = 0.0
    """Unix time of this version."""
    what: str = ""
    """The change that made this version, e.g. ``set lr=0.0003``."""

    def change(self, action: str, values: dict[str, Any]) -> Steering:
        """The next version after ``action``; ConfigError with a one-line reason if invalid."""
        if action not in ACTIONS:
            raise ConfigError(f"unknown action {action!r}; choose from {', '.join(ACTIONS)}")
        new: dict[str, Any] = {}
        if action == "set":
            if not values:
                raise ConfigError("set what? e.g. set lr=3e-4 clip=1.0")
            for key, raw in values.items():
                new[key] = _consistency(raw) if key == "consistency" else _setting(key, raw)
            what = "set " + " ".join(
                f"{k}={v}" if isinstance(v, str) else f"{k}={v:g}" for k, v in new.items()
            )
        elif values:
            raise ConfigError(f"{action} takes no values")
        elif action == "pause":
            new, what = {"paused": True}, "pause"
        elif action == "resume":
            new, what = {"paused": False}, "resume"
        else:
            new, what = {"checkpoints": self.checkpoints + 1}, "checkpoint"
        return replace(self, version=self.version + 1, changed_at=time.time(), what=what, **new)

    def overrides(self) -> dict[str, float]:
        """The optimizer fields this version sets: {OptimizerConfig field: value}."""
        return {SETTINGS[k]: v for k in SETTINGS if (v := getattr(self, k)) is not None}

    def push_scalars(self, known: int) -> dict[str, float]:
        """What a push carries: the newest version known, this version and its settings."""
        out = {KNOWN: float(known), IN_FORCE: float(self.version)}
        out.update({f"min.{k}": v for k, v in self.overrides().items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Steering:
        """ConfigError unless ``raw`` is a valid document."""
        if not isinstance(raw, dict):
            raise ConfigError("a steering document is a mapping")
        try:
            doc = cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"bad steering document: {exc}") from None
        if not isinstance(doc.version, int) or doc.version < 0:
            raise ConfigError("bad steering document: version")
        for key in SETTINGS:
            value = getattr(doc, key)
            if value is not None:
                _setting(key, value)
        if not isinstance(doc.paused, bool) or not isinstance(doc.checkpoints, int):
            raise ConfigError("bad steering document: paused, checkpoints")
        if doc.consistency:
            _consistency(doc.consistency)
        return doc


def optimizer_settings(scalars: dict[str, float]) -> dict[str, float]:
    """The optimizer fields a push's (or a clock's reduced) scalars set."""
    out = {}
    for field_name in SETTINGS.values():
        value = scalars.get(f"min.{field_name}")
        if value is not None and math.isfinite(value) and value >= 0:
            out[field_name] = value
    return out


@dataclass(slots=True)
class SteeringLog:
    """The versions the scheduler handed out (the newest few), to answer a worker that needs
    a version it did not see."""

    versions: list[Steering] = field(default_factory=lambda: [Steering()])
    keep: int = 256

    @property
    def newest(self) -> Steering:
        return self.versions[-1]

    def add(self, doc: Steering) -> None:
        self.versions.append(doc)
        del self.versions[: -self.keep]

    def get(self, version: int) -> Steering | None:
        for doc in reversed(self.versions):
            if doc.version == version:
                return doc
        return None

    def to_dict(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.versions]

    @classmethod
    def start(cls, raw: Any) -> SteeringLog:
        """From a saved list of versions, or one version (a run resumed from a checkpoint)."""
        if isinstance(raw, list) and raw:
            return cls([Steering.from_dict(d) for d in raw])
        if isinstance(raw, dict):
            return cls([Steering.from_dict(raw)])
        return cls()


def parse_assignments(items: list[str]) -> dict[str, float | str]:
    """``["lr=3e-4", "consistency=ssp:3"]`` -> {"lr": 0.0003, "consistency": "ssp:3"};
    ConfigError if malformed."""
    out: dict[str, float | str] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        if key == "consistency":
            out[key] = _consistency(raw)
            continue
        if key not in SETTINGS:
            raise ConfigError(f"cannot set {key!r}; settable: {', '.join(SETTINGS)}, consistency")
        try:
            out[key] = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not a number") from None
    return out


def _consistency(raw: Any) -> str:
    """A consistency model a running job may change to: bsp, ssp:S or asp."""
    if not isinstance(raw, str):
        raise ConfigError("consistency must be bsp, ssp:S or asp")
    mode = Consistency.parse(raw)
    if mode.kind == "local":
        raise ConfigError("a running job cannot change to local SGD: choose bsp, ssp:S or asp")
    return str(mode)


def _setting(key: str, raw: Any) -> float:
    if key not in SETTINGS:
        raise ConfigError(f"cannot set {key!r}; settable: {', '.join(SETTINGS)}, consistency")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ConfigError(f"{key} must be a number")
    value = float(raw)
    if not math.isfinite(value) or value < 0 or (key == "lr" and value > 10):
        raise ConfigError(f"{key} must be a finite number >= 0 (lr at most 10), got {raw}")
    return value
