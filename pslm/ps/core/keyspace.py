"""The key space: named tensors cut into chunks, and chunks assigned to servers.

    ks = KeySpace.build([("fc.weight", (512, 784)), ("fc.bias", (512,))], num_servers=2)
    ks.shard(0)        # the chunks server 0 holds, in its buffer order
    ks.loads()         # bytes per server

How the assignment is made (deterministic, documented because clients and servers must agree):

1. Every tensor, in the order given, is flattened and cut into chunks of ``chunk_bytes`` (the last
   chunk of a tensor may be shorter). Keys number the chunks 0, 1, 2, ... in that order.
2. Chunks are taken largest first (ties: lower key first) and each goes to the server with the
   least bytes so far (ties: lower server rank). This is Graham's greedy list scheduling: the
   busiest server ends within one chunk of the mean load.
3. On each server, chunks whose tensor takes weight decay come first, then the other dense
   chunks, then the chunks of row tensors, each group in key order; that is the order of the
   server's flat buffer and of every message to it.
4. On the wire, a server's dense chunks travel as pieces: a chunk of SMALL_CHUNK bytes or more,
   or any chunk of a tensor cut into several, is a piece of its own; runs of smaller chunks
   (whole small tensors) are packed into pieces of up to PIECE_BYTES. Each piece is one frame,
   so a model of many small tensors costs a few frames, not hundreds; and tensors laid out
   back to back in piece order (``PSClient.allocate``) make every piece one span of memory.

Row tensors (``rows``, e.g. an untied token embedding) are pushed and pulled by rows: a step
touches only the rows of the tokens in its batch. Their chunks hold whole rows (chunk_bytes
rounded down to a multiple of the row, at least one row), take no weight decay, and travel one
chunk at a time, never in pieces.

Parameters live as fp32 on the servers, so a chunk of ``chunk_bytes`` holds chunk_bytes / 4
elements. By default tensors with two or more dimensions take weight decay and 1-D tensors
(biases, norms) do not, as in nanoGPT and torchtitan.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from pslm.errors import ConfigError

DEFAULT_CHUNK_BYTES = 4 << 20
PARAM_BYTES = 4  # servers keep fp32
MAX_NAME = 512
MAX_TENSORS = 1 << 16
MAX_CHUNKS = 1 << 20
MAX_SERVERS = 1 << 12
SMALL_CHUNK = 1 << 20
PIECE_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named parameter tensor."""

    name: str
    shape: tuple[int, ...]
    decay: bool
    rows: bool = False
    """Pushed and pulled by rows of ``shape[0]`` (a sparse embedding); never decayed."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_width(self) -> int:
        """Elements per row (for row tensors)."""
        return math.prod(self.shape[1:])


@dataclass(frozen=True, slots=True)
class Chunk:
    """A contiguous run of one flattened tensor, held by one server."""

    key: int
    tensor: int
    """Index of the tensor in ``KeySpace.tensors``."""
    offset: int
    """First element, within the flattened tensor."""
    length: int
    server: int


class KeySpace:
    """Tensors, their chunks, and which server holds each chunk. Immutable once built."""

    def __init__(self, tensors: Sequence[TensorSpec], num_servers: int, chunk_bytes: int):
        _check(tensors, num_servers, chunk_bytes)
        self.tensors = tuple(tensors)
        self.num_servers = num_servers
        self.chunk_bytes = chunk_bytes
        self.index = {t.name: i for i, t in enumerate(self.tensors)}
        self.chunks = _assign(_cut(self.tensors, chunk_bytes // PARAM_BYTES), num_servers)
        buckets: list[list[Chunk]] = [[] for _ in range(num_servers)]
        for c in self.chunks:
            buckets[c.server].append(c)
        self._shards = [sorted(b, key=self._shard_order) for b in buckets]
        self._dense = [sum(not self.tensors[c.tensor].rows for c in b) for b in self._shards]
        self._pieces = [
            pack_pieces(
                [c.length for c in shard[:n]],
                [c.length != self.tensors[c.tensor].numel for c in shard[:n]],
            )
            for shard, n in zip(self._shards, self._dense, strict=True)
        ]

    def _shard_order(self, c: Chunk) -> tuple[bool, bool, int]:
        t = self.tensors[c.tensor]
        return (t.rows, not t.decay, c.key)

    @classmethod
    def build(
        cls,
        named_shapes: Iterable[tuple[str, Sequence[int]]],
        num_servers: int,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        decay_1d: bool = False,
        rows: Iterable[str] = (),
    ) -> KeySpace:
        """A key space for ``(name, shape)`` pairs, in the order given.

        ``decay_1d`` makes 1-D tensors take weight decay too; the tensors named in ``rows``
        (two or more dimensions) are row tensors.
        """
        row_names = set(rows)
        specs = []
        for name, shape in named_shapes:
            shape = tuple(int(d) for d in shape)
            by_rows = name in row_names
            if by_rows and len(shape) < 2:
                raise ConfigError(f"row tensor {name!r} needs two or more dimensions")
            decay = not by_rows and (decay_1d or len(shape) >= 2)
            specs.append(TensorSpec(name, shape, decay=decay, rows=by_rows))
        if unknown := row_names - {s.name for s in specs}:
            raise ConfigError(f"row tensors not in the key space: {sorted(unknown)}")
        return cls(specs, num_servers, chunk_bytes)

    def shard(self, server: int) -> list[Chunk]:
        """The chunks ``server`` holds, in the order of its buffer and of its messages."""
        return self._shards[server]

    def pieces(self, server: int) -> list[tuple[int, int]]:
        """How ``server``'s dense chunks travel: ranges [lo, hi) of positions in
        ``shard(server)``."""
        return self._pieces[server]

    def piece_sizes(self, server: int) -> list[int]:
        """The element count of each of ``server``'s dense pieces."""
        lengths = [c.length for c in self.shard(server)]
        return [sum(lengths[lo:hi]) for lo, hi in self.pieces(server)]

    def dense(self, server: int) -> int:
        """How many of ``server``'s chunks are dense: they come first in ``shard(server)``,
        the chunks of row tensors after them."""
        return self._dense[server]

    def row_tensors(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.rows]

    def loads(self) -> list[int]:
        """Bytes held by each server."""
        return [sum(c.length for c in shard) * PARAM_BYTES for shard in self._shards]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-able description from which ``from_dict`` rebuilds the same key space."""
        return {
            "tensors": [[t.name, list(t.shape), t.decay, t.rows] for t in self.tensors],
            "num_servers": self.num_servers,
            "chunk_bytes": self.chunk_bytes,
        }

    @classmethod
    def from_dict(cls, d: Any) -> KeySpace:
        """Rebuild from ``to_dict`` output received from a peer; ConfigError if malformed."""
        try:
            specs = [_spec(entry) for entry in d["tensors"]]
            return cls(specs, _int(d["num_servers"]), _int(d["chunk_bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"malformed key space description: {exc!r}") from None

    def fingerprint(self) -> str:
        """A short hash of the description: equal key spaces have equal fingerprints."""
        packed = msgpack.packb(self.to_dict(), use_bin_type=True)
        return hashlib.sha256(packed).hexdigest()[:16]

    def describe_difference(self, other: KeySpace) -> str:
        """The first way ``other`` differs from this key space, for error messages."""
        for a, b in zip(self.tensors, other.tensors, strict=False):
            if a != b:
                return (
                    f"tensor {a.name!r} {list(a.shape)} decay={a.decay} rows={a.rows} vs "
                    f"{b.name!r} {list(b.shape)} decay={b.decay} rows={b.rows}"
                )
        if len(self.tensors) != len(other.tensors):
            return f"{len(self.tensors)} tensors vs {len(other.tensors)}"
        if self.num_servers != other.num_servers:
            return f"{self.num_servers} servers vs {other.num_servers}"
        return f"chunk size {self.chunk_bytes} vs {other.chunk_bytes}"


def _check(tensors: Sequence[TensorSpec], num_servers: int, chunk_bytes: int) -> None:
    if not 1 <= num_servers <= MAX_SERVERS:
        raise ConfigError(f"need 1 to {MAX_SERVERS} servers, got {num_servers}")
    if chunk_bytes < PARAM_BYTES or chunk_bytes % PARAM_BYTES:
        raise ConfigError(f"chunk_bytes must be a positive multiple of 4, got {chunk_bytes}")
    if not 0 < len(tensors) <= MAX_TENSORS:
        raise ConfigError(f"the key space needs 1 to {MAX_TENSORS} tensors, got {len(tensors)}")
    seen = set()
    for t in tensors:
        if not t.name or len(t.name) > MAX_NAME:
            raise ConfigError(f"tensor names must have 1 to {MAX_NAME} characters: {t.name!r}")
        if t.name in seen:
            raise ConfigError(f"tensor name {t.name!r} appears twice")
        seen.add(t.name)
        if any(d < 0 for d in t.shape) or t.numel == 0:
            raise ConfigError(f"tensor {t.name!r} has shape {list(t.shape)}: no elements")
        if t.rows and (len(t.shape) < 2 or t.decay):
            raise ConfigError(f"row tensor {t.name!r} needs 2+ dimensions and no weight decay")
    chunk_elems = chunk_bytes // PARAM_BYTES
    if sum(-(-t.numel // _chunk_elems(t, chunk_elems)) for t in tensors) > MAX_CHUNKS:
        raise ConfigError(f"more than {MAX_CHUNKS} chunks: raise chunk_bytes ({chunk_bytes})")


def pack_pieces(lengths: Sequence[int], alone: Sequence[bool]) -> list[tuple[int, int]]:
    """Ranges of chunk positions sent as one piece each (rule 4 of the module docstring);
    ``alone[i]``: chunk i is part of a tensor of several chunks, a piece of its own."""
    pieces: list[tuple[int, int]] = []
    lo, size = 0, 0
    for i, n in enumerate(lengths):
        nbytes = n * PARAM_BYTES
        single = nbytes >= SMALL_CHUNK or alone[i]
        if single or size + nbytes > PIECE_BYTES:
            if lo < i:
                pieces.append((lo, i))
            lo, size = i, 0
        size += nbytes
        if single:
            pieces.append((i, i + 1))
            lo, size = i + 1, 0
    if lo < len(lengths):
        pieces.append((lo, len(lengths)))
    return pieces


def _chunk_elems(t: TensorSpec, chunk_elems: int) -> int:
    """Elements per chunk of ``t``: whole rows for row tensors."""
    if not t.rows:
        return chunk_elems
    return max(1, chunk_elems // t.row_width) * t.row_width


def _cut(tensors: Sequence[TensorSpec], chunk_elems: int) -> list[tuple[int, int, int]]:
    """(tensor index, offset, length) of every chunk, in key order."""
    return [
        (i, off, min(n, t.numel - off))
        for i, t in enumerate(tensors)
        for n in [_chunk_elems(t, chunk_elems)]
        for off in range(0, t.numel, n)
    ]


def _assign(pieces: list[tuple[int, int, int]], num_servers: int) -> tuple[Chunk, ...]:
    order = sorted(range(len(pieces)), key=lambda k: (-pieces[k][2], k))
    heap = [(0, s) for s in range(num_servers)]  # (load, server): least loaded, lowest rank
    server_of = [0] * len(pieces)
    for k in order:
        load, s = heapq.heappop(heap)
        server_of[k] = s
        heapq.heappush(heap, (load + pieces[k][2], s))
    return tuple(
        Chunk(key=k, tensor=t, offset=off, length=n, server=server_of[k])
        for k, (t, off, n) in enumerate(pieces)
    )


def _spec(entry: Any) -> TensorSpec:
    """[name, shape, decay] or [name, shape, decay, rows] (rows: False when absent)."""
    if not isinstance(entry, list) or len(entry) not in (3, 4):
        raise TypeError("a tensor is [name, shape, decay, rows]")
    rows = _bool(entry[3]) if len(entry) == 4 else False
    return TensorSpec(_str(entry[0]), tuple(_dims(entry[1])), _bool(entry[2]), rows)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected a boolean, got {type(v).__name__}")
    return v


def _dims(shape: Any) -> list[int]:
    if not isinstance(shape, list) or len(shape) > 8:
        raise TypeError("a shape must be a list of at most 8 integers")
    return [_int(d) for d in shape]
