"""Compression codecs: stated errors, error feedback, malformed input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pslm.errors import ConfigError, ProtocolError
from pslm.wire.codecs import ErrorFeedback, get_codec
from pslm.wire.message import Message, decode, encode

vectors = st.integers(1, 3000).flatmap(
    lambda n: st.integers(0, 2**31 - 1).map(
        lambda seed: torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 10
    )
)


def _wire(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    return decode(encode(Message("x", tensors=parts))).tensors  # as a peer receives them


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_casts_round_to_the_format(x: torch.Tensor) -> None:
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        codec = get_codec(name)
        parts = codec.encode(x)
        assert parts[0].dtype == dtype and parts[0].nbytes == x.nbytes // 2
        assert torch.equal(codec.decode(_wire(parts), x.numel()), x.to(dtype).float())


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_int8_error_is_within_a_510th_of_the_range(x: torch.Tensor) -> None:
    codec = get_codec("int8")
    parts = codec.encode(x)
    y = codec.decode(_wire(parts), x.numel())
    span = float(x.max() - x.min())
    assert float((y - x).abs().max()) <= span / 510 * (1 + 1e-4) + 1e-6
    assert sum(p.nbytes for p in parts) == x.numel() + 8


@settings(max_examples=60, deadline=None)
@given(vectors, st.sampled_from([0.001, 0.01, 0.1, 1.0]))
def test_topk_keeps_the_largest_entries_exactly(x: torch.Tensor, ratio: float) -> None:
    codec = get_codec(f"topk:{ratio}")
    y = codec.decode(_wire(codec.encode(x)), x.numel())
    k = math.ceil(ratio * x.numel())
    kept = y != 0
    assert int(kept.sum()) <= k and torch.equal(y[kept], x[kept])
    threshold = x.abs().topk(k).values.min()
    assert bool((x.abs()[~kept] <= threshold).all())


@pytest.mark.parametrize("spec", ["topk:0.01", "int8", "bf16"])
def test_error_feedback_loses_no_gradient_mass(spec: str) -> None:
    ef = ErrorFeedback(get_codec(spec))
    gen = torch.Generator().manual_seed(0)
    produced = torch.zeros(500, dtype=torch.float64)
    applied = torch.zeros(500, dtype=torch.float64)
    for _ in range(50):
        g = torch.randn(500, generator=gen)
        produced += g.double()
        applied += ef.codec.decode(ef.encode("k", g), 500).double()
    residual = ef.residual.get("k", torch.zeros(500)).double()
    torch.testing.assert_close(applied + residual, produced, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "spec, parts, fragment",
    [
        ("none", [torch.zeros(3, dtype=torch.int64)], "float"),
        ("bf16", [torch.zeros(4)], "bfloat16"),
        ("int8", [torch.zeros(4, dtype=torch.uint8)], "expected 2 tensors"),
        ("int8", [torch.zeros(4, dtype=torch.uint8), torch.tensor([0.0, math.inf])], "finite"),
        ("topk:0.5", [torch.tensor([7], dtype=torch.int32), torch.ones(1)], "out of range"),
        ("topk:0.5", [torch.tensor([-1], dtype=torch.int32), torch.ones(1)], "out of range"),
        ("topk:0.5", [torch.tensor([1, 2], dtype=torch.int32), torch.ones(1)], "matching"),
    ],
)
def test_malformed_parts_are_refused(spec, parts, fragment) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        get_codec(spec).decode(parts, 4)


@pytest.mark.parametrize("spec", ["zip", "topk:", "topk:0", "topk:2", "topk:x"])
def test_unknown_codecs(spec: str) -> None:
    with pytest.raises(ConfigError):
        get_codec(spec)


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_casts_clamp_beyond_the_format_and_feedback_carries_the_excess(spec: str) -> None:
    big = 1e5 if spec == "fp16" else 3.4e38  # beyond each format's largest value
    ef = ErrorFeedback(get_codec(spec))
    produced = torch.zeros(2, dtype=torch.float64)
    applied = torch.zeros(2, dtype=torch.float64)
    for g in ([big, 1.0], [1.0, 1.0], [1.0, 1.0]):
        x = torch.tensor(g)
        produced += x.double()
        applied += ef.codec.decode(_wire(ef.encode("k", x)), 2).double()
        assert bool(torch.isfinite(ef.residual["k"]).all())  # not inf, then nan for good
    torch.testing.assert_close(applied + ef.residual["k"].double(), produced, rtol=1e-6, atol=0)


def test_int8_encodes_finite_values_whose_range_exceeds_fp32() -> None:
    ef = ErrorFeedback(get_codec("int8"))
    x = torch.tensor([-3e38, 3e38, 1.0])
    y = ef.codec.decode(_wire(ef.encode("k", x)), 3)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(ef.residual["k"]).all())
    assert float(y[0]) == float(x[0]) and float(y[1]) > 0  # cut at the top: the rest is residual


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_int8_refuses_non_finite_input_saying_so(bad: float) -> None:
    with pytest.raises(ProtocolError, match="inf or nan"):
        get_codec("int8").encode(torch.tensor([1.0, bad]))


@pytest.mark.parametrize("spec", ["bf16", "fp16", "topk:0.25"])
def test_a_non_finite_tensor_leaves_the_error_feedback_as_it_was(spec: str) -> None:
    """A NaN gradient (its push is skipped) must not become the residual: it would make every
    later tensor sent under the key NaN."""
    feedback = ErrorFeedback(get_codec(spec))
    x = torch.randn(64)
    feedback.encode("w", x)
    kept = feedback.residual["w"].clone()
    feedback.encode("w", torch.full((64,), float("nan")))
    assert torch.equal(feedback.residual["w"], kept)
    parts = feedback.encode("w", torch.randn(64))
    assert bool(feedback.codec.decode(parts, 64).isfinite().all())
