"""The pslm message: a msgpack header frame followed by raw tensor frames.

    msg = Message("push", body={"clock": 3}, tensors=[grad_chunk])
    frames = encode(msg)            # [header bytes, memoryview, ...], zero-copy tensor frames
    msg2 = decode(frames)           # validates everything before touching tensor memory

Header (a msgpack map, string keys):

    v      int       protocol version, must equal VERSION
    op     str       what the message asks or answers (the layers above define the ops)
    id     int       request id chosen by the sender; a reply carries the id of its request
    body   map       op-specific fields; plain msgpack values only (no extension types), and
                     every map key at any depth a string
    t      array     one [dtype, shape] pair per tensor; dtype is a wire name from frames.DTYPES

Then, for every tensor in order, its bytes in ``frame_count(nbytes)`` frames of at most
MAX_FRAME bytes. Nothing here ever unpickles: a header is msgpack with extension types refused,
every size is checked against the frames actually received, and limits bound the header, the
number of tensors and the total bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import msgpack

from pslm.errors import ProtocolError

if TYPE_CHECKING:
    import torch

# torch is imported only when a message carries tensors, so that control-plane processes
# (the scheduler) start without it.

VERSION = 1
MAX_FRAME = 16 << 20
"""Largest frame pslm sends or accepts, in bytes."""
MAX_NDIM = 8
MAX_DIM = 1 << 48
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "i64": 8, "i8": 1, "u8": 1}
"""Wire dtype names and their sizes in bytes. Anything else is refused."""
MAX_HEADER = 1 << 20
"""Largest header frame accepted, in bytes."""
MAX_TENSORS = 1 << 16
"""Most tensors one message may carry."""
MAX_OP_LEN = 64
DEFAULT_MAX_MESSAGE = 8 << 30
"""Default bound on the tensor bytes of one message; receivers may set a lower one."""

MAX_ID = (1 << 63) - 1


@dataclass(slots=True)
class Message:
    """One request or reply. ``tensors`` are views over received frames after ``decode``."""

    op: str
    id: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)
    wire: tuple[list[Any], list[Any]] | None = None
    """``encode_tensors(tensors)`` made ahead, for tensors sent again and again from the same
    memory (a planned push_pull); None: made at each ``encode``."""
    sender: str = ""
    """On a listener: the role its sender proved when it connected (``pslm.wire.auth.ROLES``;
    empty without a cluster secret). Never read from the message itself."""

    def reply(self, op: str = "ok", **body: Any) -> Message:
        """A reply to this message: same id, the given op and body."""
        return Message(op, id=self.id, body=body)


def frame_count(nbytes: int) -> int:
    """How many frames a tensor of ``nbytes`` bytes takes (an empty tensor still takes one)."""
    return max(1, math.ceil(nbytes / MAX_FRAME))


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg``: header bytes, then zero-copy views of each tensor's memory."""
    descs, data = msg.wire or encode_tensors(msg.tensors)
    header = {"v": VERSION, "op": msg.op, "id": msg.id, "body": msg.body, "t": descs}
    return [msgpack.packb(header, use_bin_type=True), *data]


def encode_tensors(tensors: Sequence[torch.Tensor]) -> tuple[list[Any], list[Any]]:
    """The header's descriptors of ``tensors`` and their data frames (zero-copy views: the
    memory must stay as it is until the frames are sent)."""
    descs: list[Any] = []
    data: list[Any] = []
    if tensors:
        from pslm.wire.frames import dtype_name, tensor_to_frames
    for t in tensors:
        descs.append([dtype_name(t.dtype), list(t.shape)])
        data.extend(tensor_to_frames(t))
    return descs, data


def decode(frames: Sequence[Any], *, max_bytes: int = DEFAULT_MAX_MESSAGE) -> Message:
    """Parse and validate ``frames`` (zmq Frames, bytes or buffers) into a Message.

    Raises ProtocolError naming the first thing wrong; ``err.request_id`` is the request id
    when the header was readable, so the receiver can still answer with an error.
    """
    try:
        return _decode(frames, max_bytes)
    except ProtocolError as exc:
        if exc.request_id is None:  # e.g. another version, or a bytes key: still answerable
            exc.request_id = _readable_id(frames)
        raise
    except Exception as exc:  # a hole in the checks below must not become a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err = ProtocolError(f"malformed message: {type(exc).__name__}: {first}")
        err.request_id = _readable_id(frames)
        raise err from exc


def _readable_id(frames: Sequence[Any]) -> int | None:
    """The request id of a message whose header parses, else None."""
    try:
        raw = _buffer(frames[0])
        if raw.nbytes > MAX_HEADER:
            return None
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
        rid = header["id"]
        return rid if _valid_id(rid) else None
    except Exception:
        return None


def _valid_id(rid: Any) -> TypeGuard[int]:
    return type(rid) is int and 0 <= rid <= MAX_ID


def _decode(frames: Sequence[Any], max_bytes: int) -> Message:
    if not frames:
        raise ProtocolError("empty message")
    header = _parse_header(_buffer(frames[0]))
    op, rid, body, descs = _check_header(header)
    try:
        sizes = _check_tensors(descs, max_bytes)
        parts = [_buffer(f) for f in frames[1:]]
        _check_frames(sizes, parts)
    except ProtocolError as exc:
        exc.request_id = rid
        raise
    tensors = []
    if sizes:
        from pslm.wire.frames import tensor_from_frames
    i = 0
    for (dtype, shape), nbytes in zip(descs, sizes, strict=True):
        n = frame_count(nbytes)
        tensors.append(tensor_from_frames(parts[i : i + n], dtype, shape))
        i += n
    return Message(op, id=rid, body=body, tensors=tensors)


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    try:
        return memoryview(buf)
    except TypeError:
        raise ProtocolError(f"frame of type {type(frame).__name__} is not a buffer") from None


def _parse_header(raw: memoryview) -> Any:
    if raw.nbytes > MAX_HEADER:
        raise ProtocolError(f"header of {raw.nbytes} bytes exceeds the {MAX_HEADER}-byte limit")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,  # (str or bytes keys; _str_keys refuses bytes)
            object_hook=_str_keys,
            ext_hook=_refuse_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {exc}") from exc


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed in headers")


def _str_keys(m: dict[Any, Any]) -> dict[Any, Any]:
    """Refuse a map with a bytes key (a body's keys are compared with str names above)."""
    for k in m:
        if type(k) is not str:
            raise ProtocolError(f"map keys must be strings, got {type(k).__name__} {k!r:.40}")
    return m


def _check_header(header: Any) -> tuple[str, int, dict[str, Any], list[Any]]:
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    version = header.get("v")
    if type(version) is not int or version != VERSION:  # (True == 1.0 == 1)
        raise ProtocolError(f"protocol version {version!r}, expected {VERSION}")
    rid = header.get("id")
    if not _valid_id(rid):
        raise ProtocolError(f"request id must be an integer in [0, 2**63), got {rid!r}")
    op = header.get("op")
    body = header.get("body", {})
    descs = header.get("t", [])
    try:
        if not isinstance(op, str) or not 0 < len(op) <= MAX_OP_LEN:
            raise ProtocolError(f"op must be a non-empty string of <= {MAX_OP_LEN} chars")
        if not isinstance(body, dict):
            raise ProtocolError(f"body must be a map, got {type(body).__name__}")
        if not isinstance(descs, list) or len(descs) > MAX_TENSORS:
            raise ProtocolError(f"'t' must be a list of at most {MAX_TENSORS} descriptors")
    except ProtocolError as exc:
        exc.request_id = rid
        raise
    return op, rid, body, descs


def _check_tensors(descs: list[Any], max_bytes: int) -> list[int]:
    """Byte size of every described tensor, after checking dtype, shape and the total."""
    sizes = []
    total = 0
    for i, desc in enumerate(descs):
        if not (isinstance(desc, list) and len(desc) == 2):
            raise ProtocolError(f"tensor {i}: descriptor must be [dtype, shape]")
        dtype, shape = desc
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise ProtocolError(f"tensor {i}: dtype {dtype!r} is not one of {sorted(ITEMSIZE)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM):
            raise ProtocolError(f"tensor {i}: shape must be a list of <= {MAX_NDIM} ints")
        numel = span = 1
        for d in shape:
            if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_DIM:
                raise ProtocolError(f"tensor {i}: bad dimension {d!r} in shape {shape!r}")
            numel *= d
            span *= max(d, 1)
        # an empty tensor's other dimensions still set its strides and what ops on it allocate
        if span * ITEMSIZE[dtype] > max_bytes:
            raise ProtocolError(f"tensor {i}: shape {shape!r} exceeds the {max_bytes}-byte limit")
        nbytes = numel * ITEMSIZE[dtype]
        total += nbytes
        if total > max_bytes:
            raise ProtocolError(f"message carries more than the {max_bytes}-byte limit")
        sizes.append(nbytes)
    return sizes


def _check_frames(sizes: list[int], parts: list[memoryview]) -> None:
    expected = sum(frame_count(n) for n in sizes)
    if len(parts) != expected:
        raise ProtocolError(f"header describes {expected} data frames, message has {len(parts)}")
    i = 0
    for t, nbytes in enumerate(sizes):
        for k in range(frame_count(nbytes)):
            want = min(MAX_FRAME, nbytes - k * MAX_FRAME)
            if parts[i].nbytes != want:
                raise ProtocolError(
                    f"tensor {t} frame {k}: {parts[i].nbytes} bytes, header implies {want}"
                )
            i += 1
