"""Requests on a shard as a whole: worker 0's ``init`` (the key space, optimizer, consistency
model and values, or a checkpoint to restore) and ``save`` (write the shard into a checkpoint
directory).

    state = initialise(msg, current, shard=0, num_servers=2, num_workers=2)
    reply = save(msg, state.store, shard=0, num_servers=2)

Both check the whole request before building or writing anything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pslm.errors import ConfigError, ProtocolError, RefusedError
from pslm.ps.core import protocol
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.server.shard import ShardStore
from pslm.ps.server.state import ShardState
from pslm.wire.message import Message

log = logging.getLogger("pslm.server")


def initialise(
    msg: Message, current: ShardState | None, *, shard: int, num_servers: int, num_workers: int
) -> ShardState | None:
    """The shard's state that ``msg`` (an ``init``) asks for; None when ``current`` is that
    already (the same again is answered as the first was). Refused when ``current`` holds
    another model, optimizer or consistency model."""
    raw = protocol.field(msg, "keyspace", dict)
    if raw.get("num_servers") != num_servers:  # before building anything
        raise ConfigError(
            f"key space is cut for {raw.get('num_servers')!r} servers, the cluster has "
            f"{num_servers}"
        )
    ks = KeySpace.from_dict(raw)
    opt = OptimizerConfig.from_dict(protocol.field(msg, "optimizer", dict))
    mode = Consistency.from_dict(protocol.field(msg, "consistency", dict, {}))
    if current is not None:
        same = (
            ks.fingerprint() == current.store.keyspace.fingerprint()
            and opt == current.store.optimizer
            and mode == current.consistency
        )
        if not same:
            raise RefusedError(
                "already initialised with another model, optimizer or consistency model"
            )
        return None
    store = ShardStore(ks, shard, opt)
    restore = protocol.field(msg, "restore", str, "")
    clock = protocol.field(msg, "clock", int, 0)
    if clock < 0:
        raise ProtocolError(f"init: clock must be >= 0, got {clock}")
    if restore:  # a checkpoint's shard, not the values in the message
        if msg.tensors:
            raise ProtocolError("init: restore takes no tensors")
        path = Path(restore) / shard_file(shard, num_servers)
        store.restore(path)
        log.info("restored version %d from %s", store.version, path)
    else:
        store.load(msg.tensors)
    # every worker resumes at ``clock``
    state = ShardState.fresh(store, mode, num_workers=num_workers, clock=clock)
    log.info(
        "initialised: %d chunks, %d parameters, %s, %s, version %d",
        len(store.chunks),
        store.numel,
        opt.name,
        mode,
        store.version,
    )
    return state


def save(msg: Message, store: ShardStore, *, shard: int, num_servers: int) -> Message:
    """Write the shard (parameters, optimizer state) into the existing directory ``msg``
    names, at the version it names; the reply says where and how many bytes."""
    directory = Path(protocol.field(msg, "path", str))
    version = protocol.field(msg, "version", int)
    if version != store.version:
        raise RefusedError(
            f"save asked for version {version}; the server is at {store.version}",
            code="bad_clock",
        )
    if not directory.is_dir():
        raise RefusedError(f"save: {directory} is not a directory", code="bad_path")
    path = directory / shard_file(shard, num_servers)
    nbytes = store.save(path)
    log.info("saved version %d to %s (%d bytes)", version, path, nbytes)
    return msg.reply(version=version, file=str(path), bytes=nbytes)


def within(path: str, root: str, what: str) -> None:
    """RefusedError (``bad_path``) unless ``path`` lies inside ``root`` once ``..`` is
    resolved (an empty path or root: nothing to check). Links are not followed: a run
    directory whose checkpoints folder links to another disk is the operator's choice."""
    if not path or not root:
        return
    resolved = Path(os.path.normpath(os.path.abspath(path)))
    top = Path(os.path.normpath(os.path.abspath(root)))
    if not resolved.is_relative_to(top):
        raise RefusedError(
            f"{what}: {path} is outside the run directory {root} (a server saves and restores "
            f"checkpoints only inside its --run-dir)",
            code="bad_path",
        )


def shard_file(rank: int, num_servers: int) -> str:
    """The file name of server ``rank``'s part of a checkpoint."""
    return f"shard-{rank:03d}-of-{num_servers:03d}.safetensors"
