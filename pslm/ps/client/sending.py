"""A worker's pushes on their way out: one message per server (or parts of one), and what
each reply will carry. Used by ``PSClient``; returns at once, ``PSClient.wait`` collects.

    req = send_push(channel, layout, feedback, memory, failover, head, grads, scalars, rows)
    plan, key = planner.cached(grads, out)          # a push_pull worked out once, or None
    plan = planner.make(key, grads, out, layout)    # (unless planner.hopeless(key, layout))
    req = send_planned(channel, plan, head, scalars, out)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pslm.ps.client import encode
from pslm.ps.client.encode import Rows, scalars_for
from pslm.ps.client.failover import Failover
from pslm.ps.client.layout import Expect, Layout, Plan, signature
from pslm.ps.client.shm import WorkerMemory
from pslm.ps.core.push import PushHeader
from pslm.wire.codecs import ErrorFeedback
from pslm.wire.message import Message
from pslm.wire.transport import Channel


@dataclass(slots=True)
class Request:
    """A request in flight: its messages, and where their replies go."""

    ids: dict[int, int]
    """Message id -> the server it went to."""
    expect: dict[int, Expect]
    """Message id -> what its reply carries."""
    out: Mapping[str, torch.Tensor] | None
    sent: int = 0
    """Tensor bytes sent."""
    shared: tuple[int, ...] = ()
    """The servers it went to through shared memory."""
    plan: Plan | None = None
    """A planned push_pull: where its replies go."""
    parts: dict[int, int] = field(default_factory=dict)
    """Message id -> which part of a planned push it is."""


def send_push(
    channel: Channel,
    layout: Layout,
    feedback: ErrorFeedback,
    memory: WorkerMemory | None,
    failover: Failover,
    head: PushHeader,
    grads: Mapping[str, torch.Tensor],
    scalars: Mapping[str, float] | None,
    rows: Rows | None,
    out: Mapping[str, torch.Tensor] | None,
    *,
    retain: bool,
) -> Request:
    """Send ``head``'s push of ``grads`` to every server: through shared memory where a
    ``push_pull`` (``out``) may take it, else encoded on the socket. ``retain``: keep a copy
    of each message until its server has applied it (BSP acknowledges on arrival)."""
    wanted = encode.row_selection(layout.keyspace, rows)
    ids: dict[int, int] = {}
    expect: dict[int, Expect] = {}
    sent = 0
    shared: list[int] = []
    for s in range(len(layout.slots)):
        mine = replace(head, scalars=scalars_for(s, scalars))
        if out is not None and memory is not None and memory.ready(s):
            sent += memory.stage(s, encode.pack(layout, grads, s))
            memory.exchanges += 1
            shared.append(s)
            mine.shm = memory.segment.name
            tensors = []
        else:
            tensors = encode.encode_dense(feedback, layout, grads, s, head.share)
        row_tensors, row_expect = encode.encode_rows(grads, layout.rows(s), wanted)
        mine.row_keys = [slot.key for slot in layout.rows(s)]
        tensors += row_tensors
        sent += sum(t.numel() * t.element_size() for t in tensors)
        msg = Message("push", body=mine.to_body(), tensors=tensors)
        rid = channel.send(f"server-{s}", msg)
        if retain:
            failover.retain(s, head.clock, msg)
        ids[rid] = s
        expect[rid] = Expect(pieces=True, rows=row_expect, shared=mine.shm is not None)
    if memory is not None:
        memory.busy.update(shared)
    return Request(ids, expect, out, sent, tuple(shared))


def send_planned(
    channel: Channel,
    plan: Plan,
    head: PushHeader,
    scalars: Mapping[str, float] | None,
    out: Mapping[str, torch.Tensor],
) -> Request:
    """``push_pull`` along ``plan``: each server's spans of the gradients as they are."""
    ids: dict[int, int] = {}
    parts: dict[int, int] = {}
    for s, messages in enumerate(plan.messages):
        mine = scalars_for(s, scalars)
        for i, (part, tensors, wire) in enumerate(messages):
            this = head if part is None else head.with_part(part)
            if part is None or part.final:  # the scalars come with the last part
                this = replace(this, scalars=mine)
            msg = Message("push", body=this.to_body(), tensors=tensors, wire=wire)
            rid = channel.send(f"server-{s}", msg)
            ids[rid] = s
            if part is not None:
                parts[rid] = i
    return Request(ids, {}, out, plan.nbytes, plan=plan, parts=parts)


class Planner:
    """The Plan of the last ``push_pull`` (``pslm.ps.client.layout.Plan``), kept while its
    two mappings keep their tensors: on every step's path, so checked in microseconds."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        """The last push_pull's Plan."""
        self.no_plan: list[Any] = []
        """The signature of the last pair of mappings no plan could be made for."""

    def cached(
        self, grads: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]
    ) -> tuple[Plan | None, list[Any]]:
        """(the last Plan if both mappings are unchanged, else None; their signature)."""
        key = signature(grads) + signature(out)
        if self.plan is not None and self.plan.key == key:
            return self.plan, key
        return None, key

    def hopeless(self, key: list[Any], layout: Layout) -> bool:
        """Whether no plan can be made for mappings of signature ``key``: row tensors, or
        the last mappings no plan could be made for."""
        return key == self.no_plan or bool(layout.keyspace.row_tensors())

    def make(
        self,
        key: list[Any],
        grads: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        layout: Layout,
    ) -> Plan | None:
        """A new Plan for the mappings of signature ``key`` (checked by the caller), or None
        where one cannot be made (remembered, so that the next step does not try again)."""
        ks = layout.keyspace
        pieces = [ks.pieces(s) for s in range(len(layout.slots))]
        self.plan = Plan.make(grads, out, layout.slots, pieces)
        if self.plan is None:
            self.no_plan = key
        return self.plan
