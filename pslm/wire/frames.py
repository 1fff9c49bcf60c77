"""Tensors to ZeroMQ frames and back, without copying.

    parts = tensor_to_frames(t)                  # memoryviews over t's storage, each <= MAX_FRAME
    t2 = tensor_from_frames(parts, "f32", [3, 4])  # a view over the received frame

A tensor is sent as its raw little-endian bytes (C order), cut into frames of at most
``MAX_FRAME`` bytes. A tensor that fits one frame comes back as a view of the received buffer;
a larger one is reassembled with one copy (the price of keeping frames <= 16 MiB, which is where
ZeroMQ over loopback is fastest on this machine, DESIGN.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from pslm.errors import ProtocolError
from pslm.wire.message import ITEMSIZE, MAX_FRAME

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i32": torch.int32,
    "i64": torch.int64,
    "i8": torch.int8,
    "u8": torch.uint8,
}
"""The torch dtype of each wire dtype name."""
assert set(DTYPES) == set(ITEMSIZE)

DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - no such machine in sight
    raise ImportError("pslm's wire format is little-endian; this machine is big-endian")


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; ProtocolError for dtypes the wire does not carry."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(
            f"dtype {dtype} is not carried on the wire; use one of {sorted(DTYPES)}"
        ) from None


def tensor_to_frames(t: torch.Tensor) -> list[memoryview]:
    """Zero-copy byte views of a contiguous CPU tensor, each at most MAX_FRAME bytes.

    The views share ``t``'s memory: do not modify ``t`` until the frames have been sent.
    """
    if t.device.type != "cpu":
        raise ProtocolError(f"only CPU tensors go on the wire, got one on {t.device}")
    if not t.is_contiguous():
        raise ProtocolError("only contiguous tensors go on the wire; call .contiguous() first")
    dtype_name(t.dtype)
    raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    if raw.nbytes <= MAX_FRAME:
        return [raw]
    return [raw[i : i + MAX_FRAME] for i in range(0, raw.nbytes, MAX_FRAME)]


def tensor_from_frames(parts: Sequence[Any], dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The tensor that ``parts`` (buffers: zmq frames' ``.buffer``, bytes, memoryviews) carry.

    One part: a view over its memory, no copy. Several parts: concatenated with one copy.
    Sizes must already be validated (see ``message.decode``).
    """
    torch_dtype = DTYPES[dtype]
    if len(parts) == 1:
        flat = _view(parts[0], torch_dtype)
    else:
        flat = torch.cat([_view(p, torch.uint8) for p in parts]).view(torch_dtype)
    return flat if len(shape) == 1 else flat.view(tuple(shape))


def _view(buf: Any, dtype: torch.dtype) -> torch.Tensor:
    mv = memoryview(buf)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    if mv.readonly:
        # torch cannot wrap read-only memory without a warning; only bytes objects get here
        # (tests, small copied frames), never the zero-copy path.
        return torch.frombuffer(bytearray(mv), dtype=dtype)
    t = torch.frombuffer(mv, dtype=dtype)  # (sizes are checked: a whole number of items)
    if t.data_ptr() % dtype.itemsize:  # ZeroMQ packs small frames at any offset: align by copying
        t = torch.frombuffer(mv, dtype=torch.uint8).clone().view(dtype)
    return t
