"""What a shard's server holds and its backup mirrors, listed once.

    state = ShardState.fresh(store, consistency, num_workers=2, clock=0)   # after ``init``
    msg = state.to_message(shard=0)             # ``sync``: the whole shard, to its backup
    copy = ShardState.from_message(msg, shard=0, num_workers=2)            # the backup's side

Besides the parameters, optimizer state and step counters (the store), a server that takes a
shard over needs to know where the shard's server stood: the version, every worker's clock, the
last clock's scalars and pushers (for a push sent again), this shard's recent parts of the
squared norm (for a peer that missed them). Everything else a server keeps is about requests
in flight, which the workers send again to whoever serves the shard next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pslm.errors import ProtocolError, RefusedError
from pslm.ps.core import protocol
from pslm.ps.core.consistency import Consistency, StalenessGate
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.server.shard import ShardStore
from pslm.wire.message import Message


@dataclass(kw_only=True, slots=True)
class ShardState:
    """A shard and where its server stood."""

    store: ShardStore
    """Parameters, optimizer state, step counters and the version."""
    consistency: Consistency
    gate: StalenessGate
    """Every worker's clock (SSP/ASP: the pushes taken of each share)."""
    scalars: dict[str, float] = field(default_factory=dict)
    """The last clock's mean scalars (BSP: for a push sent again after its update)."""
    by: list[int] = field(default_factory=list)
    """Who pushed each share of the last clock (BSP)."""
    skipped: int = 0
    """SSP/ASP: pushes not applied because their gradient was not finite (every shard sees
    every push's flag, so every shard counts the same)."""
    norms: dict[int, float] = field(default_factory=dict)
    """Clock -> this shard's part of the squared global norm, for the last clocks (sent again
    to a server that takes a peer's shard over)."""

    @classmethod
    def fresh(
        cls, store: ShardStore, consistency: Consistency, *, num_workers: int, clock: int
    ) -> ShardState:
        """A shard just initialised (or restored): every worker's clock at ``clock``."""
        gate = StalenessGate(num_workers, consistency.bound)
        gate.clocks = [clock] * num_workers
        return cls(store=store, consistency=consistency, gate=gate)

    def keep_norm(self, clock: int, sq: float) -> None:
        """This shard's part of the squared norm for ``clock``; only the last two are kept."""
        self.norms[clock] = sq
        for old in [c for c in self.norms if c < clock - 1]:
            del self.norms[old]

    def to_message(self, shard: int) -> Message:
        """``sync``: the whole shard (copies: the live buffers go on changing while it
        travels)."""
        state = self.store.state_tensors()
        body = {
            "shard": shard,
            "keyspace": self.store.keyspace.to_dict(),
            "optimizer": self.store.base_optimizer.to_dict(),  # live settings come with updates
            "consistency": self.consistency.to_dict(),
            "version": self.store.version,
            "clocks": list(self.gate.clocks),
            "scalars": self.scalars,
            "by": self.by,
            "skipped": self.skipped,
            "norms": {str(c): sq for c, sq in self.norms.items()},
            "names": list(state),
        }
        return Message("sync", body=body, tensors=[t.clone() for t in state.values()])

    @classmethod
    def from_message(
        cls, msg: Message, shard: int, num_workers: int, *, replaces: int = 0
    ) -> ShardState:
        """The shard a ``sync`` carries, in a new store, checked whole first (``replaces``:
        bytes of the copy it replaces, which count as free memory)."""
        if protocol.field(msg, "shard", int) != shard:
            raise RefusedError(f"this server is the backup of shard {shard}")
        store = ShardStore(
            KeySpace.from_dict(protocol.field(msg, "keyspace", dict)),
            shard,
            OptimizerConfig.from_dict(protocol.field(msg, "optimizer", dict)),
            replaces=replaces,
        )
        clocks = protocol.ints(protocol.field(msg, "clocks", list))
        names = protocol.field(msg, "names", list)
        if len(clocks) != num_workers or any(c < 0 for c in clocks):
            raise ProtocolError(f"sync: clocks must be {num_workers} clocks >= 0")
        if len(names) != len(msg.tensors) or not all(isinstance(n, str) for n in names):
            raise ProtocolError("sync: one name per tensor")
        tensors = dict(zip(names, msg.tensors, strict=True))
        store.load_state(tensors, protocol.field(msg, "version", int), "sync")
        skipped = protocol.field(msg, "skipped", int, 0)
        if skipped < 0:
            raise ProtocolError(f"sync: skipped must be >= 0, got {skipped}")
        norms = protocol.field(msg, "norms", dict, {})
        consistency = Consistency.from_dict(protocol.field(msg, "consistency", dict))
        gate = StalenessGate(num_workers, consistency.bound)
        gate.clocks = clocks
        return cls(
            store=store,
            consistency=consistency,
            gate=gate,
            scalars=protocol.scalars(protocol.field(msg, "scalars", dict, {})),
            by=protocol.ints(protocol.field(msg, "by", list, [])),
            skipped=skipped,
            norms={int(c): float(v) for c, v in norms.items() if str(c).isdigit()},
        )
