"""Replication messages: a backup that takes a sync and then the server's updates holds the
server's shard bit for bit; anything malformed is refused before it changes anything."""

from __future__ import annotations

import math

import pytest
import torch

from pslm.errors import ProtocolError, RefusedError
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.server.replica import Update, mirror, read_update, update_message
from pslm.ps.server.shard import RowGrad, ShardStore
from pslm.ps.server.state import ShardState
from pslm.wire.message import Message, decode, encode

ADAMW = OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1, clip_norm=1.0)


def _wire(msg: Message) -> Message:
    """``msg`` as a peer receives it: frames copied (as another process has them), decoded."""
    return decode([bytes(memoryview(f)) for f in encode(msg)])


def _server() -> ShardStore:
    ks = KeySpace.build([("w", (6, 4)), ("b", (4,)), ("emb", (10, 4))], 1, rows=["emb"])
    store = ShardStore(ks, 0, ADAMW)
    gen = torch.Generator().manual_seed(0)
    store.load(
        [torch.randn(t.numel(), generator=gen) for t in [*store.packed[:-1], store.views[-1]]]
    )
    return store


def _grads(store: ShardStore, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    dense = [torch.randn(n, generator=gen) for n in store.lengths[: store.n_dense]]
    rows = torch.tensor([1, 4, 7])
    return [*dense, RowGrad(rows, torch.randn(3, 4, generator=gen))]


def test_a_synced_backup_follows_the_server_bit_for_bit() -> None:
    server = _server()
    for seed in range(2):  # the server is a few updates in when the backup appears
        server.apply(_grads(server, seed), 0.5)
    snap = ShardState.fresh(server, Consistency(), num_workers=2, clock=2)
    snap.by = [0, 1]
    copy = ShardState.from_message(_wire(snap.to_message(0)), shard=0, num_workers=2)
    assert copy.store.version == 2 and copy.gate.clocks == [2, 2] and copy.by == [0, 1]
    for seed in range(2, 5):
        grads = _grads(server, seed)
        update = Update(kind="bsp", version=server.version, multiplier=0.7, grads=grads, step=seed)
        msg = _wire(update_message(update))  # sent before the server applies (which overwrites)
        server.apply(grads, 0.7, step=seed)
        read_update(msg, copy.store, num_workers=2).apply(copy.store)
    assert copy.store.version == server.version == 5
    for name, t in server.state_tensors().items():
        assert torch.equal(copy.store.state_tensors()[name], t), name


@pytest.mark.parametrize("kind", ["skip", "async-skip"])
def test_a_backup_mirrors_a_skipped_update(kind: str) -> None:
    server = _server()
    consistency = Consistency.parse("asp" if kind == "async-skip" else "bsp")
    snap = ShardState.fresh(server, consistency, num_workers=2, clock=0)
    copy = ShardState.from_message(_wire(snap.to_message(0)), shard=0, num_workers=2)
    update = Update(kind=kind, version=0, multiplier=1.0, grads=[], step=0, share=1)
    update.sq = float("nan")  # (a non-finite norm's skip: the backup keeps it to send again)
    update.scalars = {"skipped": 1.0} if kind == "skip" else {}
    mirror(read_update(_wire(update_message(update)), copy.store, num_workers=2), copy, 0)
    server.skip()
    assert copy.store.version == server.version == 1
    for name, t in server.state_tensors().items():
        assert torch.equal(copy.store.state_tensors()[name], t), name
    if kind == "async-skip":  # the pusher's clock passes
        assert copy.gate.clocks == [0, 1]
    else:  # a push sent again is answered with what the clock said
        assert copy.scalars == {"skipped": 1.0}
        assert list(copy.norms) == [0] and math.isnan(copy.norms[0])


def test_bad_replication_messages_change_nothing() -> None:
    server = _server()
    snap = ShardState.fresh(server, Consistency(), num_workers=1, clock=0)
    backup = ShardState.from_message(_wire(snap.to_message(0)), shard=0, num_workers=1).store
    before = {k: v.clone() for k, v in backup.state_tensors().items()}
    good = Update(kind="bsp", version=0, multiplier=1.0, grads=_grads(server, 0), step=0)
    msg = update_message(good)
    cases: list[tuple[Message, type[Exception], str]] = [
        (
            Message("update", body={**msg.body, "version": 3}, tensors=msg.tensors),
            RefusedError,
            "this backup holds 0",
        ),
        (
            Message("update", body={**msg.body, "kind": "weird"}, tensors=msg.tensors),
            ProtocolError,
            "bad kind",
        ),
        (Message("update", body=msg.body, tensors=msg.tensors[:-1]), ProtocolError, "tensors"),
        (
            Message("update", body=msg.body, tensors=[msg.tensors[0][:-1], *msg.tensors[1:]]),
            RefusedError,
            "expected a float tensor",
        ),
        (
            Message(
                "update",
                body=msg.body,
                tensors=[*msg.tensors[:-2], torch.tensor([4, 1, 7]), msg.tensors[-1]],
            ),
            RefusedError,
            "sorted unique",
        ),
        (
            Message("update", body={**msg.body, "by": [True]}, tensors=msg.tensors),
            ProtocolError,
            "integers",
        ),
        (
            Message("update", body={**msg.body, "multiplier": float("nan")}, tensors=msg.tensors),
            ProtocolError,
            "multiplier",
        ),
        (
            Message("update", body={**msg.body, "kind": "skip"}, tensors=msg.tensors),
            ProtocolError,
            "carries no tensors",
        ),
    ]
    for bad, error, fragment in cases:
        with pytest.raises(error, match=fragment):
            read_update(_wire(bad), backup, num_workers=1)
    sync = snap.to_message(0)
    with pytest.raises(RefusedError, match="backup of shard 1"):
        ShardState.from_message(_wire(sync), shard=1, num_workers=1)
    with pytest.raises(ProtocolError, match="clocks"):
        ShardState.from_message(_wire(sync), shard=0, num_workers=3)
    short = Message("sync", body=sync.body, tensors=[sync.tensors[0][:-1], *sync.tensors[1:]])
    with pytest.raises(RefusedError, match="expected fp32"):
        ShardState.from_message(_wire(short), shard=0, num_workers=1)
    for k, v in backup.state_tensors().items():
        assert torch.equal(v, before[k]), k
