"""What a push carries besides its tensors: the one definition, for both sides.

    header = PushHeader(worker=0, share=0, clock=7, weight=4.0, reply_params=True)
    msg = Message("push", body=header.to_body(), tensors=tensors)        # the worker's side
    header = PushHeader.decode(msg, num_workers=2)                       # the server's side
    part = header.with_part(PushPart(keys=[3, 4], runs=[2], seq=0, final=False, priority=1))

A worker's push for one clock reaches a server as one message, or as several parts (an
overlapped exchange, or a planned ``push_pull`` of many bytes): ``PushPart`` says which part a
message is. ``decode`` checks every field's type and range before the server touches anything;
what needs the shard to check (that the keys are this server's, the tensors' shapes) is checked
by the server's intake. Adding a field to a push means adding it here, where it is set, and
where it is used - nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from pslm.errors import ConfigError, ProtocolError
from pslm.ps.core import protocol
from pslm.wire.codecs import get_codec
from pslm.wire.message import Message

MAX_WEIGHT = float(1 << 24)
"""The largest weight a push may carry (its rows of the global batch): far above any batch,
and small enough that the weighted sum over many workers stays finite in float32."""

FINITE = "min.finite"
"""The scalar a push carries as 0.0 when its gradient is not finite (absent: finite).
A ``min.`` scalar reaches every server, so every shard of a clock sees the same flag and makes
the same choice: under BSP the whole clock is skipped, as AMP's grad scaler skips a step."""

SKIPPED = "skipped"
"""The scalar a server's reply carries when the update it answers was skipped: its reason's
code in ``SKIP_REASONS``."""

SKIPPED_PUSHES = "skipped_pushes"
"""SSP/ASP: the scalar a push's reply carries with the number of pushes (of any worker) the
servers skipped so far."""

SKIP_REASONS = {
    1.0: "a gradient was not finite",
    2.0: "the global gradient norm was not finite",
}
NONFINITE_GRAD, NONFINITE_NORM = 1.0, 2.0


def skip_reason(scalars: dict[str, float]) -> str | None:
    """Why the update these reply scalars describe was skipped (None: it was applied)."""
    code = scalars.get(SKIPPED)
    if code is None:
        return None
    return SKIP_REASONS.get(code, f"skipped (reason {code:g})")


class PushPart(NamedTuple):
    """Which part of a worker's push for one clock a message is."""

    keys: list[int]
    """The dense chunks it carries (by key, in the server's shard order)."""
    runs: list[int]
    """How many consecutive keys each of its tensors carries."""
    seq: int
    """Its number within the push: a part sent again is recognised by it."""
    final: bool
    """The push ends with it."""
    priority: int
    """Replies go out in increasing priority (the next forward pass's first)."""


@dataclass(kw_only=True, slots=True)
class PushHeader:
    """The body of a ``push`` message (``pslm.ps.core.protocol``)."""

    worker: int
    """The pushing worker's rank."""
    share: int
    """The part of the global batch these gradients are for (the worker's own by default)."""
    clock: int
    """The step these gradients are for."""
    weight: float = 1.0
    """How much this share counts in the mean (e.g. its rows of the global batch)."""
    reply_params: bool = False
    """Answer with the pushed chunks' values after the update (else with the version)."""
    codec: str = "none"
    """How the gradients are encoded (``pslm.wire.codecs``)."""
    pull_codec: str = "none"
    """How the values of the reply are encoded."""
    scalars: dict[str, float] = field(default_factory=dict)
    """Numbers averaged over the workers (``min.`` ones: the minimum), e.g. the loss."""
    sq_norm: float | None = None
    """The worker's squared gradient norm (SSP/ASP with clipping: the push is clipped by it)."""
    keys: list[int] | None = None
    """The dense chunks carried (None: all of the server's, as pieces)."""
    runs: list[int] | None = None
    """With ``keys``: how many consecutive keys each tensor carries (None: one each)."""
    row_keys: list[int] = field(default_factory=list)
    """The row chunks carried (rows, values, rows wanted back for each)."""
    seq: int = 0
    final: bool = True
    priority: int = 0
    shm: str | None = None
    """The name of the worker's shared segment holding the dense gradients
    (``pslm.ps.client.shm``), if they travel there."""

    def with_part(self, part: PushPart) -> PushHeader:
        """This header for one part of the push."""
        return replace(
            self,
            keys=part.keys,
            runs=part.runs,
            seq=part.seq,
            final=part.final,
            priority=part.priority,
        )

    def to_body(self) -> dict[str, Any]:
        """The message body: every field that differs from what ``decode`` takes by default
        (a plain push stays small)."""
        body: dict[str, Any] = {
            "worker": self.worker,
            "share": self.share,
            "clock": self.clock,
            "weight": float(self.weight),
            "reply_params": self.reply_params,
            "codec": self.codec,
            "pull_codec": self.pull_codec,
        }
        optional = {
            "scalars": self.scalars or None,
            "sq_norm": self.sq_norm,
            "keys": self.keys,
            "runs": self.runs,
            "row_keys": self.row_keys or None,
            "seq": self.seq or None,
            "final": None if self.final else False,
            "priority": self.priority or None,
            "shm": self.shm,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    @classmethod
    def decode(cls, msg: Message, num_workers: int) -> PushHeader:
        """The checked header of a push: ProtocolError naming the first bad field, or
        RefusedError (``bad_codec``) for a pull codec replies cannot use."""
        worker = protocol.field(msg, "worker", int)
        share = protocol.field(msg, "share", int, worker)
        for name, value in (("worker", worker), ("share", share)):
            if not 0 <= value < num_workers:
                raise ProtocolError(f"push: {name} {value} is not in [0, {num_workers})")
        weight = float(protocol.field(msg, "weight", (int, float), 1.0))
        if not 0 < weight <= MAX_WEIGHT:  # nan fails too
            raise ProtocolError(f"push: weight must be in (0, {MAX_WEIGHT:g}], got {weight}")
        # a bad pull codec is refused now, not after the update
        pull_codec = protocol.pull_codec(protocol.field(msg, "pull_codec", str, "none"))
        raw_sq = protocol.field(msg, "sq_norm", (int, float, type(None)), None)
        sq = None if raw_sq is None else float(raw_sq)
        scalars = protocol.scalars(protocol.field(msg, "scalars", dict, {}))
        flagged = scalars.get(FINITE, 1.0) < 1.0  # not applied: its norm may be anything
        if sq is not None and not sq >= 0 and not flagged:  # nan or negative
            raise ProtocolError(f"push: sq_norm must be >= 0, got {sq}")
        codec = protocol.field(msg, "codec", str, "none")
        get_codec(codec)  # ConfigError for an unknown one
        shm = protocol.field(msg, "shm", (str, type(None)), None)
        return cls(
            worker=worker,
            share=share,
            clock=protocol.field(msg, "clock", int),
            weight=weight,
            reply_params=protocol.field(msg, "reply_params", bool, False),
            codec=codec,
            pull_codec=pull_codec,
            scalars=scalars,
            sq_norm=sq,
            keys=protocol.field(msg, "keys", (list, type(None)), None),
            runs=protocol.field(msg, "runs", (list, type(None)), None),
            row_keys=protocol.field(msg, "row_keys", list, []),
            seq=protocol.field(msg, "seq", int, 0),
            final=protocol.field(msg, "final", bool, True),
            priority=protocol.field(msg, "priority", int, 0),
            shm=shm,
        )


def check_codecs(push: str, pull: str) -> str:
    """The push codec's canonical name; ConfigError for an unknown push or pull codec."""
    if pull not in protocol.PULL_CODECS:
        raise ConfigError(f"pulls take {', '.join(protocol.PULL_CODECS)}, not {pull!r}")
    return get_codec(push).name
