"""SSP and ASP on a server: reads waiting for the staleness gate, and changes of the
consistency model at a clock (fences). Decisions only: no sockets, nothing sent.

    reads = Reads()
    reads.wait(WaitingRead(peer, msg, clock=5, selection=sel))
    for read in reads.due(gate, fence):      # those the gate lets through now, in order
        ...answer it...; reads.answered(read, gate.staleness(read.clock))
    refusal = fence_refusal(now=Consistency.parse("bsp"), to=mode, clock=9, reached=7)

Under SSP(s) and ASP every push is applied on arrival as one optimizer step with that worker's
gradient (clipped by the norm the worker computed for it, at the learning rate of its clock); a
read by a worker at clock c waits until every worker has pushed at least c - s times (never,
under ASP). Every reply says the staleness the read saw.

A fence changes the model from a clock on (``pslm ctl set consistency``): once every push
before it is applied the server switches, and the replies that let workers read at that clock
carry the new model, so every worker switches there too. Reads at or past the clock wait for
the switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pslm.errors import RefusedError
from pslm.ps.core.consistency import Consistency, StalenessGate
from pslm.ps.server.replies import Selection
from pslm.wire.message import Message


@dataclass(slots=True)
class WaitingRead:
    """A read waiting for the staleness gate."""

    peer: bytes
    msg: Message
    clock: int
    """The reader's clock: it reads once every worker is within the bound of it."""
    selection: Selection
    scalars: dict[str, float] | None = None
    """For a push's reply: the scalars its push carried."""


@dataclass(frozen=True, slots=True)
class Fence:
    """A change of the consistency model: at ``clock``, to ``mode``."""

    clock: int
    mode: Consistency

    def holds(self, clock: int) -> bool:
        """Whether a read at ``clock`` must wait for the switch."""
        return clock >= self.clock


def fence_refusal(
    *, now: Consistency, to: Consistency, clock: int, reached: int
) -> RefusedError | None:
    """Why a fence to ``to`` at ``clock`` cannot be set while the model is ``now`` and reads up
    to ``reached`` were answered (SSP/ASP; BSP: the version); None if it can. Only between bsp
    and ssp, or to asp: from ASP, which has no bound, and to or from local SGD it is refused."""
    if "local" in (to.kind, now.kind) or now.kind == "asp":
        return RefusedError(
            f"cannot change the consistency model from {now} to {to}: only between bsp and "
            "ssp, or to asp",
            code="refused",
        )
    if clock <= reached:
        return RefusedError(
            f"a change at clock {clock} comes too late: reads at {reached} were answered",
            code="bad_clock",
        )
    return None


@dataclass(slots=True)
class Reads:
    """The reads waiting for the staleness gate, and what the answered ones saw."""

    waiting: list[WaitingRead] = field(default_factory=list)
    up_to: int = 0
    """The highest clock a read was answered at."""
    seen: dict[int, int] = field(default_factory=dict)
    """How many reads saw each staleness (logged at exit)."""

    def wait(self, read: WaitingRead) -> None:
        self.waiting.append(read)

    def due(self, gate: StalenessGate, fence: Fence | None) -> list[WaitingRead]:
        """The waiting reads the gate lets through now, in the order they came; the others
        (and those a fence holds) go on waiting."""
        due: list[WaitingRead] = []
        waiting: list[WaitingRead] = []
        for read in self.waiting:
            held = fence is not None and fence.holds(read.clock)
            (waiting if held or not gate.ready(read.clock) else due).append(read)
        self.waiting = waiting
        return due

    def answered(self, read: WaitingRead, staleness: int) -> None:
        self.seen[staleness] = self.seen.get(staleness, 0) + 1
        self.up_to = max(self.up_to, read.clock)
