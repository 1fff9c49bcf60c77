"""Client-side helpers that need no cluster."""

from __future__ import annotations

import pytest
import torch

from pslm.ps.client.layout import Plan, Slot, span_of


def test_back_to_back_chunks_are_spanned_without_copies() -> None:
    flat = torch.arange(10.0)
    tensors = {
        "a": flat[0:3],
        "b": flat[3:7],
        "c": flat[7:10],
        "other": torch.arange(4.0),
        "h1": flat[2:5].half(),
        "h2": flat[5:6].half(),
    }

    def chunks(*names: str) -> list[Slot]:
        return [Slot(i, n, 0, tensors[n].numel()) for i, n in enumerate(names)]

    run = span_of(tensors, chunks("a", "b", "c"))
    assert run is not None and run.data_ptr() == flat.data_ptr() and torch.equal(run, flat)
    assert span_of(tensors, chunks("a", "c")) is None  # a gap
    assert span_of(tensors, chunks("b", "a")) is None  # out of order
    assert span_of(tensors, chunks("a", "other")) is None  # another storage
    assert span_of(tensors, chunks("h1", "h2")) is None


def test_a_run_of_chunks_within_tensors_is_spanned() -> None:
    flat = torch.arange(12.0)
    tensors = {"a": flat[0:4].view(2, 2), "b": flat[4:10], "c": flat[10:12], "x": torch.zeros(6)}
    run = [Slot(0, "a", 2, 2), Slot(1, "b", 0, 6), Slot(2, "c", 0, 1)]
    span = span_of(tensors, run)
    assert span is not None and span.data_ptr() == flat[2:].data_ptr()
    assert torch.equal(span, flat[2:11])
    views = [tensors[s.name].reshape(-1)[s.offset : s.offset + s.length] for s in run]
    assert torch.equal(span, torch.cat(views))  # what the chunks' views hold, without a copy
    assert span_of(tensors, [Slot(0, "a", 0, 2), Slot(1, "b", 0, 6)]) is None  # a gap
    assert span_of(tensors, [Slot(1, "b", 0, 6), Slot(0, "a", 0, 4)]) is None  # out of order
    assert span_of(tensors, [Slot(2, "c", 0, 2), Slot(3, "x", 0, 6)]) is None  # two storages
    strided = {"t": torch.arange(8.0).view(2, 4).t()}  # not contiguous: never spanned
    assert span_of(strided, [Slot(0, "t", 0, 8)]) is None
    param = torch.nn.Parameter(torch.zeros(4))  # parameters given as ``out`` can be filled
    span = span_of({"w": param}, [Slot(0, "w", 0, 4)])
    assert span is not None and not span.requires_grad
    span.copy_(torch.ones(4))
    assert float(param.detach().sum()) == 4.0


def test_a_plan_checks_every_reply_before_it_fills_anything() -> None:
    from pslm.errors import ProtocolError
    from pslm.wire.message import Message

    flat_g, flat_o = torch.ones(10), torch.zeros(10)
    grads = {"a": flat_g[:4], "b": flat_g[4:6], "c": flat_g[6:]}
    out = {"a": flat_o[:4], "b": flat_o[4:6], "c": flat_o[6:]}
    # server 0 holds a and b back to back (one piece), server 1 holds c
    layout = [
        [Slot(0, "a", 0, 4, position=0), Slot(1, "b", 0, 2, position=1)],
        [Slot(2, "c", 0, 4)],
    ]
    plan = Plan.make(grads, out, layout, [[(0, 2)], [(0, 1)]])
    assert plan is not None and plan.nbytes == 40
    assert [[t.data_ptr() for t in p] for p in plan.pushes] == [
        [flat_g.data_ptr()],
        [flat_g[6:].data_ptr()],
    ]
    good = {1: Message("ok", body={}, tensors=[torch.full((6,), 2.0)])}
    for bad in (
        [torch.full((5,), 3.0)],  # wrong size
        [torch.full((4,), 3, dtype=torch.int64)],  # not floats
        [torch.full((4,), 3.0), torch.full((4,), 3.0)],  # one tensor too many
    ):
        replies = {**good, 2: Message("ok", body={}, tensors=bad)}
        with pytest.raises(ProtocolError):
            plan.fill(replies, {1: 0, 2: 1})
        assert torch.equal(flat_o, torch.zeros(10))  # all or nothing: server 0's reply waits
    shm = {**good, 2: Message("ok", body={"shm": True}, tensors=[])}
    with pytest.raises(ProtocolError, match="memory"):
        plan.fill(shm, {1: 0, 2: 1})
    plan.fill({**good, 2: Message("ok", body={}, tensors=[torch.full((4,), 3.0)])}, {1: 0, 2: 1})
    assert flat_o.tolist() == [2.0] * 6 + [3.0] * 4
    assert Plan.make(grads, {**out, "b": torch.zeros(2)}, layout, [[(0, 2)], [(0, 1)]]) is None
