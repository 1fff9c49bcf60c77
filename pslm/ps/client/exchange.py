"""One step's push and pull in parts, overlapped with backward and the next forward pass.

    plan = BucketPlan(client, order, bucket_bytes=1 << 20)   # tensors, in backward's order
    ex = Exchange(client, plan, clock=step, out=params, weight=rows)
    ex.push(b, grads)          # from a gradient hook, once bucket b's gradients are final
    ex.finish(grads, scalars={"loss": loss})    # after backward: what is left, and the end
    ex.wait(b)                 # before the next forward uses bucket b: its new values are in out
    done = ex.complete()       # everything arrived: a Completion, as PSClient.wait returns

Buckets group tensors in the order backward produces their gradients (last layers first), up
to ``bucket_bytes`` each, like DDP's buckets. ``push`` sends a bucket's chunks to each server
that holds some of them, as one part of this worker's push for ``clock``
(``pslm.ps.server.intake``); each server answers each part after the update with those
chunks' new values, the bucket the next forward pass needs first (the one pushed last)
first. The result is the same as one ``PSClient.push_pull``: the same gradients reach the same
update, only sooner.

``push`` and ``finish`` return at once; ``wait`` and ``complete`` block, each at most the
client's timeout (RequestTimeout). Not thread-safe, like the client: use it from the thread
that runs backward (on CPU, autograd runs gradient hooks in that thread).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pslm.errors import ClusterError, ConfigError
from pslm.ps.client import encode
from pslm.ps.client.client import Completion, PSClient
from pslm.ps.client.encode import scalars_for
from pslm.ps.client.layout import Expect, Slot, sq_norm
from pslm.ps.core.push import PushPart
from pslm.wire.message import Message


@dataclass(slots=True)
class Bucket:
    """Tensors whose gradients travel together."""

    names: list[str]
    priority: int
    """Replies go out in increasing priority: the next forward pass needs bucket 0 last."""
    dense: dict[int, list[Slot]] = field(default_factory=dict)
    """Server -> the bucket's dense chunks on it, in shard order."""
    rows: dict[int, list[Slot]] = field(default_factory=dict)
    """Server -> the bucket's row chunks on it."""


class BucketPlan:
    """Tensors cut into buckets, in the order backward produces their gradients."""

    def __init__(self, client: PSClient, order: Sequence[str], bucket_bytes: int = 1 << 20):
        layout = client.layout
        if layout is None:
            raise ClusterError("plan buckets after init")
        ks = layout.keyspace
        if sorted(order) != sorted(t.name for t in ks.tensors):
            raise ConfigError("the bucket order must name every tensor given to init once")
        if bucket_bytes < 1:
            raise ConfigError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        groups: list[list[str]] = [[]]
        size = 0
        for name in order:
            if size >= bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += ks.tensors[ks.index[name]].numel * 4
        self.buckets = [Bucket(g, len(groups) - 1 - b) for b, g in enumerate(groups)]
        self.bucket_of = {n: b for b, g in enumerate(groups) for n in g}
        for s in range(client.num_servers):
            for slot in layout.slots[s]:
                bucket = self.buckets[self.bucket_of[slot.name]]
                (bucket.rows if slot.width else bucket.dense).setdefault(s, []).append(slot)

        self._runs: dict[tuple[int, tuple[int, ...]], tuple[list[list[Slot]], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.buckets)

    def runs(
        self,
        client: PSClient,
        server: int,
        buckets: tuple[int, ...],
        dense: list[Slot],
        grads: Mapping[str, torch.Tensor],
    ) -> list[list[Slot]]:
        """``dense`` (the chunks of ``buckets`` on ``server``) in runs that travel as one
        tensor each; worked out once while the gradients stay where they are."""
        # runs depend on where the gradients lie: the same addresses, the same runs
        where = [grads[slot.name].data_ptr() for slot in dense]
        cached = self._runs.get((server, buckets))
        if cached is None or cached[1] != where:
            cached = (encode.runs_for(client.feedback.codec, dense, grads), where)
            self._runs[(server, buckets)] = cached
        return cached[0]


@dataclass(slots=True)
class _Sent:
    server: int
    expect: Expect
    params: bool
    """Whether the reply carries parameters (and so the version after the update)."""


class Exchange:
    """One worker's push for one clock, in parts, and the new values coming back in parts."""

    def __init__(
        self,
        client: PSClient,
        plan: BucketPlan,
        *,
        clock: int,
        out: Mapping[str, torch.Tensor],
        weight: float = 1.0,
        rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        share: int | None = None,
    ):
        if client.layout is None:
            raise ClusterError("exchange before init: call init first")
        encode.check_tensors(client.layout.keyspace, out, "exchange", full=True)
        if not weight > 0:
            raise ConfigError(f"push weight must be positive, got {weight}")
        self.client = client
        self.plan = plan
        self.clock = clock
        self.out = out
        self.weight = weight
        self.share = share
        self.layout = client.layout
        self.wanted = encode.row_selection(client.layout.keyspace, rows)
        self.pushed = [False] * len(plan)
        self.requests: list[list[int]] = [[] for _ in plan.buckets]  # bucket -> request ids
        self.sent: dict[int, _Sent] = {}
        self.replies: dict[int, Message] = {}
        self.finished = False
        self.bytes_sent = 0
        self.seq = [0] * client.num_servers  # each part's number: a part sent again is known

    def push(self, bucket: int, grads: Mapping[str, torch.Tensor]) -> None:
        """Send ``bucket``'s gradients (final: not modified until ``complete``). At once."""
        if self.pushed[bucket] or self.finished:
            raise ClusterError(f"bucket {bucket} of clock {self.clock} was already pushed")
        self.pushed[bucket] = True
        for s in range(self.client.num_servers):
            self._send(s, [bucket], grads, final=False)

    def finish(
        self, grads: Mapping[str, torch.Tensor], scalars: Mapping[str, float] | None = None
    ) -> None:
        """Push every bucket not pushed yet, and end this worker's push on every server (with
        ``scalars``, averaged over the workers as in ``push_pull``). At once."""
        if self.finished:
            raise ClusterError(f"the push for clock {self.clock} is already finished")
        encode.check_tensors(self.client.keyspace, grads, "push", full=True)
        rest = [b for b, done in enumerate(self.pushed) if not done]
        # the whole push is clipped by its own norm
        norm = sq_norm(grads) if self.client.clips_each_push else None
        for s in range(self.client.num_servers):
            self._send(s, rest, grads, final=True, sq=norm, scalars=scalars_for(s, scalars))
        self.pushed = [True] * len(self.plan)
        self.finished = True

    def wait(self, bucket: int) -> None:
        """Block until ``bucket``'s new values are in ``out`` (RequestTimeout after the
        client's timeout)."""
        todo = [i for i in self.requests[bucket] if i not in self.replies]
        if todo:
            self._collect(todo)

    def complete(self) -> Completion:
        """Block until every reply is in; what the servers said, as ``PSClient.wait``."""
        if not self.finished:
            raise ClusterError(f"complete before finish (clock {self.clock})")
        todo = [i for i in self.sent if i not in self.replies]
        if todo:
            self._collect(todo)
        with_params = [r for i, r in self.replies.items() if self.sent[i].params]
        version = min((int(r.body.get("version", 0)) for r in with_params), default=0)
        scalars: dict[str, float] = {}
        for r in self.replies.values():
            raw = r.body.get("scalars")
            if isinstance(raw, dict):
                scalars.update({str(k): float(v) for k, v in raw.items()})
        return Completion(
            version,
            scalars,
            max((float(r.body.get("held_s", 0.0)) for r in self.replies.values()), default=0.0),
            self.bytes_sent,
            sum(t.numel() * t.element_size() for r in self.replies.values() for t in r.tensors),
            max((int(r.body.get("staleness", 0)) for r in self.replies.values()), default=0),
        )

    def _send(
        self,
        server: int,
        buckets: list[int],
        grads: Mapping[str, torch.Tensor],
        *,
        final: bool,
        sq: float | None = None,
        scalars: dict[str, float] | None = None,
    ) -> None:
        mine = [
            b
            for b in buckets
            if server in self.plan.buckets[b].dense or server in self.plan.buckets[b].rows
        ]
        if not mine and not final:
            return
        dense = sorted(
            (slot for b in mine for slot in self.plan.buckets[b].dense.get(server, [])),
            key=lambda slot: slot.position,
        )
        runs = self.plan.runs(self.client, server, tuple(mine), dense, grads)
        row_slots = [slot for b in mine for slot in self.plan.buckets[b].rows.get(server, [])]
        share = self.client.rank if self.share is None else self.share
        tensors = encode.encode_runs(self.client.feedback, grads, runs, share)
        row_tensors, row_expect = encode.encode_rows(grads, row_slots, self.wanted)
        params = bool(mine)
        head = self.client.push_header(
            self.clock, self.weight, reply_params=params, share=self.share
        ).with_part(
            PushPart(
                keys=[slot.key for slot in dense],
                runs=[len(run) for run in runs],
                seq=self.seq[server],
                final=final,
                priority=min((self.plan.buckets[b].priority for b in mine), default=0),
            )
        )
        head.row_keys = [slot.key for slot in row_slots]
        head.sq_norm = sq
        head.scalars = scalars or {}
        tensors += row_tensors
        self.seq[server] += 1
        rid = self.client.channel.send(
            f"server-{server}", Message("push", body=head.to_body(), tensors=tensors)
        )
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        self.sent[rid] = _Sent(server, Expect(runs=runs, rows=row_expect), params)
        for b in mine:
            self.requests[b].append(rid)

    def _collect(self, ids: list[int]) -> None:
        def scatter(rid: int, reply: Message) -> None:
            sent = self.sent[rid]
            if sent.params:
                encode.scatter(reply, self.layout, sent.server, sent.expect, self.out)

        self.replies.update(self.client.channel.wait(ids, on_reply=scatter))
