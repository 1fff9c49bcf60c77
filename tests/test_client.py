"""Client-side helpers that need no cluster."""

from __future__ import annotations

import torch

from pslm.ps.layout import adjacent


def test_adjacent_views_are_spanned_without_copies() -> None:
    flat = torch.arange(10.0)
    a, b, c = flat[0:3], flat[3:7], flat[7:10]
    run = adjacent([a, b, c])
    assert run is not None and run.data_ptr() == flat.data_ptr() and torch.equal(run, flat)
    assert adjacent([a, c]) is None  # a gap
    assert adjacent([b, a]) is None  # out of order
    assert adjacent([a, torch.arange(4.0)]) is None  # another storage
    assert adjacent([flat[2:5].half(), flat[5:6].half()]) is None
