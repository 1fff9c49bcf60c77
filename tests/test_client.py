"""Client-side helpers that need no cluster."""

from __future__ import annotations

import torch

from pslm.ps.layout import Slot, span_of


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
