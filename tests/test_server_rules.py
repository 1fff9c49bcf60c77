"""The server's decisions, driven directly: no sockets, no server. The BSP round (when a
clock is complete, and with what multiplier), push intake and exactly-once (taken, replayed,
refused), the staleness gate's reads and fences."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pslm.errors import ProtocolError, RefusedError
from pslm.ps.core.consistency import Consistency, StalenessGate
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.core.push import (
    FINITE,
    NONFINITE_GRAD,
    NONFINITE_NORM,
    SKIPPED,
    PushHeader,
    skip_reason,
)
from pslm.ps.server.asynchronous import Fence, Reads, WaitingRead, fence_refusal
from pslm.ps.server.bsp import Norms, Reduced, Round, Skipped
from pslm.ps.server.intake import Due, Intake, PendingPush, Refused, Replayed, Taken, decode_part
from pslm.ps.server.replies import Selection
from pslm.ps.server.shard import ShardStore, clip_coef
from pslm.wire.message import Message

KS = KeySpace.build([("a", (4, 4)), ("b", (4,))], 1)


def _store() -> ShardStore:
    return ShardStore(KS, 0, OptimizerConfig(name="sgd", lr=1.0))


def _push(store: ShardStore, share: int, value: float, weight: float = 1.0) -> PendingPush:
    """A complete push of ``value`` everywhere, from worker ``share``."""
    pending = PendingPush.start(0, weight, store, share)
    head = PushHeader(worker=share, share=share, clock=0, weight=weight)
    grads = [torch.full_like(t, value) for t in store.packed[: len(KS.pieces(0))]]
    pending.add(decode_part(head, grads, store), {"loss": value})
    return pending


# --- the BSP round --------------------------------------------------------------------------


def test_a_round_decides_once_every_share_and_norm_is_in() -> None:
    store = _store()
    rnd = Round()
    rnd.add(1, _push(store, 1, 4.0), arrived=0.0)  # arrival order is not share order
    assert not rnd.full(2) and rnd.ready(num_servers=2, clip_norm=0.0) is None
    rnd.add(0, _push(store, 0, 2.0), arrived=1.0)
    assert rnd.full(2) and rnd.ready(num_servers=2, clip_norm=0.0) is None  # not reduced yet
    grads, factor = store.reduce(rnd.ordered())
    sq = store.sq_norm(grads) * factor**2
    rnd.reduced(grads, factor, 0, sq)
    assert factor == 0.5 and all(torch.equal(g, torch.full_like(g, 6.0)) for g in grads)
    assert rnd.ready(num_servers=2, clip_norm=1.0) is None  # server 1's part of the norm
    rnd.norms[1] = 3.0 * sq
    decision = rnd.ready(num_servers=2, clip_norm=1.0)
    assert decision is not None
    assert decision.multiplier == pytest.approx(0.5 * clip_coef(4.0 * sq, 1.0))
    unclipped = rnd.ready(num_servers=2, clip_norm=0.0)
    assert unclipped is not None and unclipped.multiplier == 0.5
    assert rnd.by(2) == [0, 1]
    assert rnd.mean_scalars() == {"loss": 3.0}


def test_weights_make_the_mean_and_the_scalars_weighted() -> None:
    store = _store()
    rnd = Round()
    rnd.add(0, _push(store, 0, 1.0, weight=1.0), arrived=0.0)
    rnd.add(1, _push(store, 1, 5.0, weight=3.0), arrived=0.0)
    grads, factor = store.reduce(rnd.ordered())
    rnd.reduced(grads, factor, 0, None)
    decision = rnd.ready(num_servers=1, clip_norm=0.0)
    assert decision is not None
    mean = decision.grads[0] * decision.multiplier
    assert torch.allclose(mean, torch.full_like(mean, 4.0))
    assert rnd.mean_scalars() == {"loss": 4.0}


def test_a_flagged_push_or_a_non_finite_norm_skips_the_clock() -> None:
    store = _store()
    flagged = Round()
    flagged.add(0, _push(store, 0, 1.0), arrived=0.0)
    bad = _push(store, 1, 2.0)
    bad.scalars = {FINITE: 0.0}  # the worker said its gradient is not finite
    flagged.add(1, bad, arrived=0.0)
    # decided before anything is reduced or any norm exchanged: every server sees the flag
    assert flagged.ready(num_servers=2, clip_norm=1.0) == Skipped(NONFINITE_GRAD)
    for total in (math.nan, math.inf):
        rnd = Round()
        rnd.add(0, _push(store, 0, 1.0), arrived=0.0)
        grads, factor = store.reduce(rnd.ordered())
        rnd.reduced(grads, factor, 0, 1.0)
        rnd.norms[1] = total  # another server's part: every server adds up the same total
        assert rnd.ready(num_servers=2, clip_norm=1.0) == Skipped(NONFINITE_NORM)
        unclipped = rnd.ready(num_servers=2, clip_norm=0.0)
        assert isinstance(unclipped, Reduced)
    before = store.state_tensors()["params"].clone()
    store.skip()  # what a skipped clock does to the shard: its version, nothing else
    assert store.version == 1 and torch.equal(store.state_tensors()["params"], before)
    assert float(store.state_tensors()["steps"].sum()) == 0.0
    assert skip_reason({SKIPPED: NONFINITE_GRAD}) and skip_reason({"loss": 1.0}) is None


def test_norms_go_to_the_round_ahead_or_nowhere() -> None:
    norms = Norms()
    assert norms.place(1, clock=5, version=5) == "now"
    assert norms.place(1, clock=6, version=5) == "ahead"
    assert norms.place(1, clock=4, version=5) == "old"
    assert norms.place(1, clock=9, version=5) == "dropped"
    norms.ahead[1] = 2.0
    assert norms.next_round().norms == {1: 2.0} and norms.ahead == {}


# --- push intake and exactly-once -----------------------------------------------------------


def _part(store: ShardStore, head: PushHeader, keys: list[int] | None = None):
    n = len(KS.pieces(0)) if keys is None else len(keys)
    if keys is None:
        tensors = [torch.ones_like(t) for t in store.packed[:n]]
    else:
        tensors = [torch.ones(store.lengths[store.position[k]]) for k in keys]
    return decode_part(head, tensors, store)


def _bsp(store: ShardStore, in_round: bool = False) -> Due:
    return Due(clock=store.version, version=store.version, asynchronous=False, in_round=in_round)


def test_a_new_push_is_taken_and_the_same_again_is_replayed() -> None:
    store, intake = _store(), Intake()
    head = PushHeader(worker=0, share=0, clock=0)
    taken = intake.take(head, _part(store, head), _bsp(store), store)
    assert isinstance(taken, Taken) and taken.complete and taken.superseded is None
    # the share's push waits for the round: the same message again is held with it
    again = intake.take(head, _part(store, head), _bsp(store, in_round=True), store)
    assert isinstance(again, Replayed) and again.where == "round"
    store.version = 1  # the round was applied
    late = intake.take(head, _part(store, head), _bsp(store), store)
    assert isinstance(late, Replayed) and late.where == "applied"
    store.version = 3  # the values after its update are gone
    stale = intake.take(replace(head, reply_params=True), _part(store, head), _bsp(store), store)
    assert isinstance(stale, Refused) and isinstance(stale.error, RefusedError)
    assert stale.error.code == "stale"


def test_a_push_for_the_wrong_clock_is_refused() -> None:
    store, intake = _store(), Intake()
    early = PushHeader(worker=0, share=0, clock=1)
    refused = intake.take(early, _part(store, early), _bsp(store), store)
    assert isinstance(refused, Refused) and isinstance(refused.error, RefusedError)
    assert refused.error.code == "bad_clock" and intake.incoming == {}
    due = Due(clock=2, version=7, asynchronous=True)
    ahead = PushHeader(worker=0, share=0, clock=3)
    refused = intake.take(ahead, _part(store, ahead), due, store)
    assert isinstance(refused, Refused) and isinstance(refused.error, RefusedError)
    assert refused.error.code == "bad_clock"


def test_parts_are_taken_once_each_and_a_new_holder_starts_the_share_anew() -> None:
    store, intake = _store(), Intake()
    a, b = (c.key for c in store.chunks)
    first = PushHeader(worker=0, share=0, clock=0, keys=[a], final=False, seq=0)
    taken = intake.take(first, _part(store, first, [a]), _bsp(store), store)
    assert isinstance(taken, Taken) and not taken.complete
    again = intake.take(first, _part(store, first, [a]), _bsp(store), store)
    assert isinstance(again, Replayed) and again.where == "pending"
    repeat = replace(first, seq=1)  # a new part repeating a chunk
    refused = intake.take(repeat, _part(store, repeat, [a]), _bsp(store), store)
    assert isinstance(refused, Refused) and "repeats chunks" in str(refused.error)
    # worker 1 holds share 0 now (worker 0 died midway): its whole push is the share's
    heir = PushHeader(worker=1, share=0, clock=0)
    taken = intake.take(heir, _part(store, heir), _bsp(store), store)
    assert isinstance(taken, Taken) and taken.complete
    assert taken.superseded is not None and taken.superseded.worker == 0
    assert intake.incoming == {}


def test_a_final_part_that_leaves_chunks_missing_is_refused() -> None:
    store, intake = _store(), Intake()
    a, _ = (c.key for c in store.chunks)
    head = PushHeader(worker=0, share=0, clock=0, keys=[a], final=True)
    refused = intake.take(head, _part(store, head, [a]), _bsp(store), store)
    assert isinstance(refused, Refused) and "1 chunks missing" in str(refused.error)
    assert intake.incoming == {}


def test_clipping_under_ssp_needs_the_pushs_norm() -> None:
    store, intake = _store(), Intake()
    due = Due(clock=0, version=0, asynchronous=True, needs_norm=True)
    head = PushHeader(worker=0, share=0, clock=0)
    refused = intake.take(head, _part(store, head), due, store)
    assert isinstance(refused, Refused) and isinstance(refused.error, ProtocolError)
    with_norm = replace(head, sq_norm=4.0)
    taken = intake.take(with_norm, _part(store, with_norm), due, store)
    assert isinstance(taken, Taken) and taken.pending.sq_norm == 4.0


# --- SSP/ASP reads and fences ---------------------------------------------------------------


def test_reads_wait_for_the_gate_and_a_fence() -> None:
    gate = StalenessGate(2, bound=1)
    reads = Reads()
    sel = Selection()
    for clock in (1, 2, 3):
        reads.wait(WaitingRead(b"w", Message("pull", id=clock), clock, sel))
    assert [r.clock for r in reads.due(gate, None)] == [1]  # the slowest is at 0
    gate.advance(0)
    gate.advance(1)
    fence = Fence(3, Consistency.parse("bsp"))
    due = reads.due(gate, fence)
    assert [r.clock for r in due] == [2] and [r.clock for r in reads.waiting] == [3]
    reads.answered(due[0], gate.staleness(2))
    assert reads.up_to == 2 and reads.seen == {1: 1}


@pytest.mark.parametrize(
    ("now", "to", "clock", "reached", "code"),
    [
        ("bsp", "ssp:2", 5, 4, None),
        ("ssp:2", "bsp", 5, 5, "bad_clock"),
        ("asp", "bsp", 9, 1, "refused"),
        ("bsp", "local:2", 9, 1, "refused"),
    ],
)
def test_a_fence_is_refused_from_asp_to_local_or_too_late(
    now: str, to: str, clock: int, reached: int, code: str | None
) -> None:
    refusal = fence_refusal(
        now=Consistency.parse(now), to=Consistency.parse(to), clock=clock, reached=reached
    )
    assert (refusal.code if refusal is not None else None) == code
