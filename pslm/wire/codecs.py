"""Compression codecs for tensors on the wire, pluggable like BytePS's compressors.

    codec = get_codec("topk:0.01")               # none, bf16, fp16, int8, topk:RATIO
    parts = codec.encode(x)                      # tensors to send for the 1-D fp32 tensor x
    y = codec.decode(parts, x.numel())           # 1-D float tensor; ProtocolError if malformed
    ef = ErrorFeedback(codec)
    parts = ef.encode("server-0/piece-3", grad)  # adds last step's residual, keeps the new one

Stated errors (per element): ``bf16``/``fp16`` round to the nearest value of the format and
send a value beyond its range as the format's largest; ``int8`` maps [min, max] of each chunk
onto 256 levels, error <= (max - min) / 510 (a range wider than fp32's largest value is cut at
the top; ``int8`` refuses inf and nan);
``topk:R`` sends the ceil(R * n) entries of largest magnitude of each chunk exactly and drops
the rest, which error feedback carries into the next step, so no gradient mass is lost over
steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pslm.errors import ConfigError, ProtocolError

FP32_MAX = torch.finfo(torch.float32).max


class Codec:
    """Identity: the tensor itself (no copy)."""

    name = "none"
    parts = 1
    """Tensors on the wire per encoded tensor."""
    lossless = True
    elementwise = True
    """Each value is encoded on its own, so a run of chunks may be encoded as one tensor."""

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def decode(self, parts: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        (x,) = self._expect(parts)
        _check(
            x.dim() == 1 and x.numel() == numel and x.is_floating_point(),
            f"{self.name}: expected {numel} float values, got {x.dtype} {list(x.shape)}",
        )
        return x

    def _expect(self, parts: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        _check(len(parts) == self.parts, f"{self.name}: expected {self.parts} tensors")
        return parts


class Cast(Codec):
    """fp32 as bf16 or fp16: half the bytes, the format's rounding."""

    lossless = False

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype
        self.limit = torch.finfo(dtype).max

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        # clamped, not cast to inf: error feedback then carries the excess to the next step
        # instead of an inf that makes the key's residual inf and nan for good
        return [x.clamp(-self.limit, self.limit).to(self.dtype)]

    def decode(self, parts: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        (x,) = self._expect(parts)
        _check(
            x.dtype == self.dtype and x.dim() == 1 and x.numel() == numel,
            f"{self.name}: expected {numel} values of {self.dtype}",
        )
        return x.float()


class Int8(Codec):
    """256 levels between the tensor's min and max: a byte per value plus 8 bytes."""

    name = "int8"
    parts = 2
    lossless = False
    elementwise = False  # one scale per encoded tensor: per chunk

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ProtocolError(f"int8: cannot encode inf or nan (values from {lo} to {hi})")
        # in float64: max - min of finite fp32 values may exceed fp32's largest value; the
        # scale sent is cut there, values above lo + scale go as the top level (x - lo is
        # then inf in fp32, clamped to 255) and error feedback carries the excess
        scale = min(max(hi - lo, 1e-30), FP32_MAX)
        q = ((x - lo) * (255.0 / scale)).round_().clamp_(0, 255).to(torch.uint8)
        return [q, torch.tensor([lo, scale], dtype=torch.float32)]

    def decode(self, parts: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        q, params = self._expect(parts)
        _check(
            q.dtype == torch.uint8 and q.dim() == 1 and q.numel() == numel,
            f"int8: expected {numel} uint8 values",
        )
        _check(params.dtype == torch.float32 and params.shape == (2,), "int8: bad scale")
        lo, scale = float(params[0]), float(params[1])
        _check(math.isfinite(lo) and math.isfinite(scale), "int8: non-finite scale")
        return q.float().mul_(scale / 255.0).add_(lo)


class TopK(Codec):
    """The ceil(ratio * n) entries of largest magnitude, as (int32 index, fp32 value) pairs."""

    parts = 2
    lossless = False
    elementwise = False  # the k largest of each encoded tensor: per chunk

    def __init__(self, ratio: float):
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"top-k ratio must lie in (0, 1], got {ratio}")
        self.ratio = ratio
        self.name = f"topk:{ratio:g}"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        k = min(x.numel(), math.ceil(self.ratio * x.numel()))
        idx = torch.topk(x.abs(), k, sorted=False).indices
        return [idx.to(torch.int32), x[idx]]

    def decode(self, parts: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        idx, vals = self._expect(parts)
        _check(
            idx.dtype == torch.int32
            and vals.dtype == torch.float32
            and idx.shape == vals.shape
            and idx.dim() == 1
            and idx.numel() <= numel,
            "topk: indices and values must be matching int32 and fp32 vectors",
        )
        if idx.numel():
            _check(int(idx.min()) >= 0 and int(idx.max()) < numel, "topk: index out of range")
        out = torch.zeros(numel)
        out[idx.long()] = vals
        return out


def get_codec(spec: str) -> Codec:
    """The codec named ``spec``: none, bf16, fp16, int8 or topk:RATIO (e.g. topk:0.01)."""
    if spec in ("", "none"):
        return Codec()
    if spec == "bf16":
        return Cast("bf16", torch.bfloat16)
    if spec == "fp16":
        return Cast("fp16", torch.float16)
    if spec == "int8":
        return Int8()
    if spec.startswith("topk:"):
        try:
            ratio = float(spec[5:])
        except ValueError:
            raise ConfigError(f"top-k needs a ratio, e.g. topk:0.01; got {spec!r}") from None
        return TopK(ratio)
    raise ConfigError(f"unknown codec {spec!r}; choose none, bf16, fp16, int8 or topk:RATIO")


class ErrorFeedback:
    """Keeps what a lossy codec dropped and adds it to the next tensor sent under the same key.

    Over any number of steps, sum(decoded) + residual == sum(produced) up to float rounding.
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, key: str, x: torch.Tensor) -> list[torch.Tensor]:
        if self.codec.lossless:
            return self.codec.encode(x)
        res = self.residual.get(key)
        corrected = x.float() + res if res is not None else x.float().clone()
        parts = self.codec.encode(corrected)
        residual = corrected.sub_(self.codec.decode(parts, corrected.numel()))
        # a tensor that is not finite (its push is skipped) leaves a nan or inf here: keep the
        # old residual. One fp32 sum (a fifth of a float64 one's cost, a tenth of isfinite's):
        # were a finite residual ever to sum past 3e38, the old one would be kept, which is safe
        if math.isfinite(float(residual.sum())):
            self.residual[key] = residual
        return parts


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ProtocolError(message)
