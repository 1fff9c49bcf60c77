"""A server's side of shared memory with the workers on its machine (``pslm.ps.client.shm``
describes the scheme and the worker's side).

    paths = SharedPaths()
    paths.attach(msg, worker, store)         # map the worker's segment (RefusedError if it is off)
    tensors = paths.push(head, msg.tensors, store)   # a push's dense pieces from the segment
    tensors, shm = paths.reply(msg, store, tensors)   # write the values there, send the rest
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pslm.errors import ProtocolError, RefusedError
from pslm.ps.core import protocol
from pslm.ps.core.push import PushHeader
from pslm.ps.server.shard import ShardStore
from pslm.wire.message import Message
from pslm.wire.shm import attach


@dataclass(slots=True)
class _Mapped:
    name: str
    grad: list[torch.Tensor]
    inbox: torch.Tensor


class SharedPaths:
    """A server's view of the segments of the workers on its machine."""

    def __init__(self) -> None:
        self.by_worker: dict[int, _Mapped] = {}

    def attach(self, msg: Message, worker: int, store: ShardStore) -> Message:
        """Map the segment an ``attach`` request describes; refused unless its regions fit."""
        desc = protocol.field(msg, "segment", dict)
        grad = protocol.field(msg, "grad", int)
        inbox = protocol.field(msg, "inbox", int)
        sizes = store.keyspace.piece_sizes(store.server)
        n = sum(sizes)
        numel = desc.get("numel")
        if not n:
            raise RefusedError("attach: this server holds no dense chunks", code="no_shm")
        if not isinstance(numel, int) or not all(
            0 <= at and at + n <= numel for at in (grad, inbox)
        ):
            raise RefusedError("attach: the regions do not fit the segment", code="no_shm")
        if grad < inbox < grad + n or inbox < grad < inbox + n:
            raise RefusedError("attach: the regions overlap", code="no_shm")
        try:
            memory = attach(desc, min_numel=n)
        except ProtocolError as exc:
            raise RefusedError(f"attach: {exc}", code="no_shm") from None
        self.by_worker[worker] = _Mapped(
            str(desc["name"]), list(memory[grad : grad + n].split(sizes)), memory[inbox : inbox + n]
        )
        return msg.reply()

    def push(
        self, head: PushHeader, tensors: list[torch.Tensor], store: ShardStore
    ) -> list[torch.Tensor]:
        """The tensors of a push: with its dense pieces read from the worker's segment first,
        if its header names one (``shm``)."""
        if head.shm is None:
            return tensors
        mapped = self.by_worker.get(head.worker)
        if mapped is None or mapped.name != head.shm:
            raise RefusedError(
                f"push: worker {head.worker} has no shared memory on this server", code="no_shm"
            )
        if head.keys is not None:
            raise RefusedError("push: shm carries all dense chunks, without keys", code="no_shm")
        if head.codec != "none":
            raise RefusedError("push: shm carries fp32 gradients only", code="no_shm")
        if head.pull_codec != "none":
            raise RefusedError("push: shm replies carry fp32 values only", code="no_shm")
        return mapped.grad + tensors

    def reply(
        self, msg: Message, store: ShardStore, tensors: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], bool]:
        """For a reply with ``tensors`` (dense pieces first) to ``msg``: the tensors left to
        send, and whether the dense values went to the worker's inbox instead."""
        if "shm" not in msg.body:  # reads and pulls carry no worker field
            return tensors, False
        mapped = self._mapped(msg, protocol.field(msg, "worker", int))
        if mapped is None:  # a worker that died and was replaced since
            return tensors, False
        n_pieces = len(store.keyspace.pieces(store.server))
        mapped.inbox.copy_(store.params[: mapped.inbox.numel()])
        return tensors[n_pieces:], True

    def _mapped(self, msg: Message, worker: int) -> _Mapped | None:
        """The segment a message marked ``shm`` names, if ``worker`` attached it."""
        name = msg.body.get("shm")
        mapped = self.by_worker.get(worker)
        return mapped if name is not None and mapped is not None and mapped.name == name else None
