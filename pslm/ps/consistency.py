"""Consistency models and the staleness gate.

    c = Consistency.parse("ssp:3")          # or "bsp", "asp"
    gate = StalenessGate(num_workers=2, bound=c.bound)
    gate.advance(worker)                    # a push from ``worker`` was applied
    gate.ready(clock)                       # may a worker at ``clock`` read now?
    gate.staleness(clock)                   # how many of its own clocks a read may miss

Every worker has a clock: the number of steps it has pushed. Under BSP the servers apply one
averaged update per clock (see ``server``). Under SSP(s) (Bosen semantics) and ASP each push is
applied as it arrives; a read by a worker at clock c waits until every worker's clock is at
least c - s (SSP) or never waits (ASP). The staleness a read saw is its clock minus the slowest
worker's clock: the number of steps whose updates it may be missing. SSP bounds it by s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pslm.errors import ConfigError

KINDS = ("bsp", "ssp", "asp")


@dataclass(frozen=True, slots=True)
class Consistency:
    """A consistency model: ``bsp``, ``ssp`` with a staleness bound, or ``asp``."""

    kind: str = "bsp"
    staleness: int = 0
    """SSP's bound s: a worker at clock c reads once every worker has reached c - s."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"consistency must be one of bsp, ssp:S, asp; got {self.kind!r}")
        if self.staleness < 0 or (self.kind != "ssp" and self.staleness):
            raise ConfigError("only ssp takes a staleness bound, and it must be >= 0")

    @classmethod
    def parse(cls, text: str) -> Consistency:
        """``bsp``, ``asp`` or ``ssp:S``."""
        kind, _, bound = text.strip().lower().partition(":")
        if kind not in KINDS:
            raise ConfigError(f"consistency must be one of bsp, ssp:S, asp; got {text!r}")
        if kind == "ssp":
            if not bound.isdigit():
                raise ConfigError(f"ssp needs a staleness bound, e.g. ssp:3; got {text!r}")
            return cls("ssp", int(bound))
        if bound:
            raise ConfigError(f"{kind} takes no bound; got {text!r}")
        return cls(kind)

    @property
    def asynchronous(self) -> bool:
        """Whether pushes are applied one by one as they arrive (SSP, ASP)."""
        return self.kind != "bsp"

    @property
    def bound(self) -> int | None:
        """The staleness a read may see: 0 for BSP, s for SSP, None (unbounded) for ASP."""
        return None if self.kind == "asp" else self.staleness

    def __str__(self) -> str:
        return f"ssp:{self.staleness}" if self.kind == "ssp" else self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "staleness": self.staleness}

    @classmethod
    def from_dict(cls, d: Any) -> Consistency:
        """From ``to_dict`` output received from a peer; ConfigError if malformed."""
        if not isinstance(d, dict) or set(d) - {"kind", "staleness"}:
            raise ConfigError(f"malformed consistency: {d!r}")
        kind, bound = d.get("kind", "bsp"), d.get("staleness", 0)
        if not isinstance(kind, str) or isinstance(bound, bool) or not isinstance(bound, int):
            raise ConfigError(f"malformed consistency: {d!r}")
        return cls(kind, bound)


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
