"""Shared memory between processes of one machine: the bulk path for a worker and a server
that run side by side (as BytePS moves tensors through shared memory within a machine).

    seg = Segment.create(numel, tag="w0")        # the owner (a worker): fp32 zeros
    seg.tensor                                   # one flat fp32 tensor over the memory
    desc = seg.describe()                        # what a peer needs to map it (msgpack-safe)
    peer = attach(desc, min_numel=n)             # the peer (a server): the same memory
    seg.close()                                  # the owner is done; the peer's mapping stays

The memory is an anonymous ``memfd`` of the owner: nothing is left in ``/dev/shm`` whatever
happens to either process, and it is freed once neither maps it. A peer reaches it through
``/proc/<pid>/fd/<fd>`` (same machine, same user) and maps it only when the description holds
up: the name carries a random token that must match, the size must cover what the peer will
touch, and the owner must have sealed the size so that it can never shrink under the peer's
mapping (a shrunk mapping kills the reader with SIGBUS). Only bytes are shared: what they mean
is agreed by the messages that go with them.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pslm.errors import ProtocolError

PREFIX = "pslm-"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""The owner can neither shrink nor grow the memory, nor lift these seals."""


def boot_id() -> str:
    """This machine's boot id: two processes share memory only when theirs are equal."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def available() -> bool:
    """Whether this system offers what a segment needs (Linux: memfd, seals, /proc)."""
    return hasattr(os, "memfd_create") and bool(boot_id())


@dataclass(slots=True)
class Segment:
    """A shared fp32 buffer; ``tensor`` is a flat view of all of it."""

    tensor: torch.Tensor
    name: str
    fd: int
    _map: mmap.mmap

    @classmethod
    def create(cls, numel: int, *, tag: str) -> Segment:
        """``numel`` zeroed fp32 values in new shared memory, sealed at that size."""
        if numel < 1:
            raise ValueError(f"a segment holds at least one value, not {numel}")
        name = f"{PREFIX}{tag}-{secrets.token_hex(8)}"
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, numel * 4)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            mapped = mmap.mmap(fd, numel * 4)
        except BaseException:
            os.close(fd)
            raise
        return cls(torch.frombuffer(mapped, dtype=torch.float32), name, fd, mapped)

    def describe(self) -> dict[str, Any]:
        """What ``attach`` needs, as plain values for a message body."""
        return {
            "pid": os.getpid(),
            "fd": self.fd,
            "name": self.name,
            "boot": boot_id(),
            "numel": self.tensor.numel(),
        }

    def close(self) -> None:
        """Give up the owner's handle; the memory lives on while a peer still maps it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def attach(desc: Any, *, min_numel: int) -> torch.Tensor:
    """Map the segment ``desc`` describes (from ``Segment.describe``, received in a message)
    as one flat fp32 tensor. ProtocolError, saying why, unless it is a sealed pslm segment of
    at least ``min_numel`` values on this machine."""
    if not isinstance(desc, dict):
        raise ProtocolError("shared memory: the description must be a map")
    pid, fd, name, boot, numel = (desc.get(k) for k in ("pid", "fd", "name", "boot", "numel"))
    ints = (pid, fd, numel)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ints):
        raise ProtocolError("shared memory: pid, fd and numel must be non-negative integers")
    if not (isinstance(name, str) and name.startswith(PREFIX) and isinstance(boot, str)):
        raise ProtocolError("shared memory: not a pslm segment")
    if not boot or boot != boot_id():
        raise ProtocolError("shared memory: the segment is on another machine")
    assert isinstance(pid, int) and isinstance(fd, int) and isinstance(numel, int)
    if numel < min_numel:
        raise ProtocolError(f"shared memory: {numel} values, {min_numel} needed")
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if os.readlink(path) != f"/memfd:{name} (deleted)":
            raise ProtocolError(f"shared memory: {path} is not the segment {name}")
        mine = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"shared memory: cannot open {path}: {exc.strerror}") from None
    try:
        if fcntl.fcntl(mine, fcntl.F_GET_SEALS) & SEALS != SEALS:
            raise ProtocolError(f"shared memory: {name} is not sealed at its size")
        if os.fstat(mine).st_size != numel * 4:
            raise ProtocolError(f"shared memory: {name} is not {numel} values long")
        mapped = mmap.mmap(mine, numel * 4)
    finally:
        os.close(mine)
    return torch.frombuffer(mapped, dtype=torch.float32)
