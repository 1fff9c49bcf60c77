"""Key space: chunking, balanced deterministic assignment, shard order, validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pslm.errors import ConfigError
from pslm.ps.core.keyspace import PIECE_BYTES, SMALL_CHUNK, KeySpace, pack_pieces

shapes = st.lists(
    st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple), min_size=1, max_size=12
)


def _build(dims: list[tuple[int, ...]], servers: int, chunk_bytes: int) -> KeySpace:
    return KeySpace.build(
        ((f"t{i}", d) for i, d in enumerate(dims)), servers, chunk_bytes=chunk_bytes
    )


@settings(max_examples=200, deadline=None)
@given(shapes, st.integers(1, 8), st.sampled_from([16, 64, 400, 4096]))
def test_busiest_server_is_within_one_chunk_of_the_mean(dims, servers, chunk_bytes) -> None:
    ks = _build(dims, servers, chunk_bytes)
    loads = ks.loads()
    biggest = max(c.length for c in ks.chunks) * 4
    assert max(loads) - sum(loads) / servers <= biggest
    assert sum(loads) == ks.numel * 4


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(1, 5), st.sampled_from([16, 64, 400]))
def test_every_element_is_in_exactly_one_chunk(dims, servers, chunk_bytes) -> None:
    ks = _build(dims, servers, chunk_bytes)
    for i, t in enumerate(ks.tensors):
        runs = sorted((c.offset, c.length) for c in ks.chunks if c.tensor == i)
        pos = 0
        for off, n in runs:
            assert off == pos and 0 < n <= chunk_bytes // 4
            pos += n
        assert pos == t.numel
    held = sorted(c.key for s in range(servers) for c in ks.shard(s))
    assert held == list(range(len(ks.chunks)))


@settings(max_examples=50, deadline=None)
@given(shapes, st.integers(1, 5))
def test_assignment_is_deterministic_and_survives_the_wire(dims, servers) -> None:
    a = _build(dims, servers, 64)
    b = KeySpace.from_dict(a.to_dict())
    assert a.chunks == b.chunks and a.fingerprint() == b.fingerprint()
    assert [a.shard(s) for s in range(servers)] == [b.shard(s) for s in range(servers)]


def test_documented_example_assignment() -> None:
    # 3 chunks of 4 elements for "w", 1 of 2 for "b": largest first, least-loaded server
    ks = KeySpace.build([("w", (3, 4)), ("b", (2,))], 2, chunk_bytes=16)
    assert [(c.key, c.tensor, c.offset, c.length, c.server) for c in ks.chunks] == [
        (0, 0, 0, 4, 0),
        (1, 0, 4, 4, 1),
        (2, 0, 8, 4, 0),
        (3, 1, 0, 2, 1),
    ]
    assert ks.loads() == [32, 24]


def test_shard_order_puts_decayed_tensors_first() -> None:
    ks = KeySpace.build([("bias", (8,)), ("weight", (2, 4)), ("norm", (4,))], 1, chunk_bytes=16)
    names = [ks.tensors[c.tensor].name for c in ks.shard(0)]
    assert names == ["weight", "weight", "bias", "bias", "norm"]
    assert [t.decay for t in ks.tensors] == [False, True, False]
    ks1 = KeySpace.build([("bias", (8,))], 1, decay_1d=True)
    assert ks1.tensors[0].decay


@pytest.mark.parametrize(
    "named, servers, chunk, fragment",
    [
        ([("a", (2,)), ("a", (3,))], 1, 64, "twice"),
        ([("a", (0, 3))], 1, 64, "no elements"),
        ([("", (3,))], 1, 64, "names"),
        ([], 1, 64, "1 to"),
        ([("a", (3,))], 0, 64, "1 to 4096 servers"),
        ([("a", (3,))], 1, 6, "multiple of 4"),
        ([("a", (1 << 22,))], 1, 4, "chunks"),
    ],
)
def test_bad_key_spaces_are_refused(named, servers, chunk, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        KeySpace.build(named, servers, chunk_bytes=chunk)


@pytest.mark.parametrize(
    "d",
    [
        {},
        {"tensors": "x", "num_servers": 1, "chunk_bytes": 64},
        {"tensors": [["a", [2], "yes"]], "num_servers": 1, "chunk_bytes": 64},
        {"tensors": [["a", [2.5], True]], "num_servers": 1, "chunk_bytes": 64},
        {"tensors": [["a", [2], True]], "num_servers": True, "chunk_bytes": 64},
        {"tensors": [[1, [2], True]], "num_servers": 1, "chunk_bytes": 64},
    ],
)
def test_malformed_descriptions_raise_config_error(d) -> None:
    with pytest.raises(ConfigError):
        KeySpace.from_dict(d)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 600_000), st.booleans()), max_size=40))
def test_pieces_cover_the_shard_and_pack_only_small_whole_tensors(chunks) -> None:
    lengths = [n for n, _ in chunks]
    alone = [a for _, a in chunks]
    pieces = pack_pieces(lengths, alone)
    assert [i for lo, hi in pieces for i in range(lo, hi)] == list(range(len(lengths)))
    for lo, hi in pieces:
        if hi - lo > 1:
            assert all(n * 4 < SMALL_CHUNK for n in lengths[lo:hi])
            assert not any(alone[lo:hi])
            assert sum(lengths[lo:hi]) * 4 <= PIECE_BYTES


def test_the_short_last_chunk_of_a_large_tensor_travels_alone() -> None:
    # 4.5 MiB: a 4 MiB chunk and a 0.5 MiB one, which would otherwise be packed with the biases
    named = [("big", (1152, 1024)), ("b1", (1024,)), ("b2", (1024,))]
    ks = KeySpace.build(named, 1)
    shard = ks.shard(0)
    by_piece = [
        [ks.tensors[shard[i].tensor].name for i in range(lo, hi)] for lo, hi in ks.pieces(0)
    ]
    assert sorted(map(sorted, by_piece)) == [["b1", "b2"], ["big"], ["big"]]


def test_a_model_of_small_tensors_travels_in_few_pieces() -> None:
    named = [(f"layer{i}.weight", (128, 128)) for i in range(24)] + [("wte", (65, 128))]
    ks = KeySpace.build(named, 2)
    assert [len(ks.pieces(s)) for s in range(2)] == [1, 1]
    assert sum(len(ks.shard(s)) for s in range(2)) == 25


def test_absurd_server_counts_are_refused() -> None:
    with pytest.raises(ConfigError, match="1 to 4096 servers"):
        KeySpace.from_dict(
            {"tensors": [["w", [4], True]], "num_servers": 3_000_000, "chunk_bytes": 64}
        )


def test_a_decay_mismatch_is_named() -> None:
    a = KeySpace.build([("x", (4,))], 1)
    b = KeySpace.build([("x", (4,))], 1, decay_1d=True)
    assert "decay=False" in a.describe_difference(b) and "decay=True" in a.describe_difference(b)
