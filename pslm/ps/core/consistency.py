"""Consistency models and the staleness gate.

    c = Consistency.parse("ssp:3")          # or "bsp", "asp", "local:4"
    gate = StalenessGate(num_workers=2, bound=c.bound)
    gate.advance(worker)                    # a push from ``worker`` was applied
    gate.ready(clock)                       # may a worker at ``clock`` read now?
    gate.staleness(clock)                   # how many of its own clocks a read may miss

Every worker has a clock: the number of steps it has pushed. Under BSP the servers apply one
averaged update per clock (see ``server``). Under SSP(s) (Bosen semantics) and ASP each push is
applied as it arrives; a read by a worker at clock c waits until every worker's clock is at
least c - s (SSP) or never waits (ASP). Under local:H (local SGD) each worker takes H steps
of its own optimizer, then pushes the change of its parameters; the servers average the
changes, round by round, as under BSP. The staleness a read saw is its clock minus the slowest
worker's clock: the number of steps whose updates it may be missing. SSP bounds it by s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pslm.errors import ConfigError

KINDS = ("bsp", "ssp", "asp", "local")
CHOICES = "bsp, ssp:S, asp, local:H"


@dataclass(frozen=True, slots=True)
class Consistency:
    """A consistency model: ``bsp``, ``ssp`` with a staleness bound, ``asp``, or ``local``
    with a period."""

    kind: str = "bsp"
    staleness: int = 0
    """SSP's bound s: a worker at clock c reads once every worker has reached c - s."""
    period: int = 0
    """local:H: the local steps between two averagings."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"consistency must be one of {CHOICES}; got {self.kind!r}")
        if self.staleness < 0 or (self.kind != "ssp" and self.staleness):
            raise ConfigError("only ssp takes a staleness bound, and it must be >= 0")
        if (self.kind == "local") != (self.period >= 1) or self.period < 0:
            raise ConfigError("local takes a period H >= 1 (local:H), and only local does")

    @classmethod
    def parse(cls, text: str) -> Consistency:
        """``bsp``, ``asp`` or ``ssp:S``."""
        kind, _, bound = text.strip().lower().partition(":")
        if kind not in KINDS:
            raise ConfigError(f"consistency must be one of {CHOICES}; got {text!r}")
        if kind in ("ssp", "local"):
            if not bound.isdigit():
                raise ConfigError(f"{kind} needs a number, e.g. {kind}:3; got {text!r}")
            return cls("ssp", int(bound)) if kind == "ssp" else cls("local", period=int(bound))
        if bound:
            raise ConfigError(f"{kind} takes no bound; got {text!r}")
        return cls(kind)

    @property
    def asynchronous(self) -> bool:
        """Whether pushes are applied one by one as they arrive (SSP, ASP)."""
        return self.kind in ("ssp", "asp")

    @property
    def bound(self) -> int | None:
        """The staleness a read may see: 0 for BSP, s for SSP, None (unbounded) for ASP."""
        return None if self.kind == "asp" else self.staleness

    def __str__(self) -> str:
        if self.kind == "ssp":
            return f"ssp:{self.staleness}"
        return f"local:{self.period}" if self.kind == "local" else self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "staleness": self.staleness, "period": self.period}

    @classmethod
    def from_dict(cls, d: Any) -> Consistency:
        """From ``to_dict`` output received from a peer; ConfigError if malformed."""
        if not isinstance(d, dict) or set(d) - {"kind", "staleness", "period"}:
            raise ConfigError(f"malformed consistency: {d!r}")
        kind, bound, period = d.get("kind", "bsp"), d.get("staleness", 0), d.get("period", 0)
        numbers = (bound, period)
        if not isinstance(kind, str) or any(
            isinstance(n, bool) or not isinstance(n, int) for n in numbers
        ):
            raise ConfigError(f"malformed consistency: {d!r}")
        return cls(kind, bound, period)


class StalenessGate:
    """Worker clocks on one server, and whether a read at a given clock may proceed."""

    def __init__(self, num_workers: int, bound: int | None):
        self.clocks = [0] * num_workers
        self.bound = bound

    def advance(self, worker: int) -> None:
        self.clocks[worker] += 1

    @property
    def slowest(self) -> int:
        return min(self.clocks)

    def ready(self, clock: int) -> bool:
        """A worker at ``clock`` may read: every worker is within the bound of it."""
        return self.bound is None or self.slowest >= clock - self.bound

    def staleness(self, clock: int) -> int:
        """Steps a read at ``clock`` may miss: how far the slowest worker is behind it."""
        return max(0, clock - self.slowest)
