"""The scheduler's record of each node, and what it can tell of a node's process.

node = NodeRecord(role="worker", requested_rank=-1, address="", pid=4242, host="vm",
                  peer=b"...")
node.rank = 0; node.state = "alive"        # once the cluster is complete
pid_alive(node.pid)                        # only meaningful where node.host is this host
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

MAX_PID = 2**31 - 1
"""The largest process id a node may report (``pid_t`` is 32 bits; Linux stops at 2**22)."""


@dataclass(slots=True)
class NodeRecord:
    """One registered node: where it is, what it is, whether it lives."""

    role: str
    requested_rank: int
    address: str
    pid: int
    host: str
    peer: bytes
    """Its connection's identity at the scheduler's socket (b"": not known yet)."""
    rank: int = -1
    state: str = "registering"
    """``registering``, ``alive``, ``dead`` (silent) or ``exited`` (said goodbye)."""
    last_seen: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.time)
    stats: dict[str, float] = field(default_factory=dict)
    """What the node reported with its last heartbeat (a server: bytes in and out, ...)."""

    @property
    def id(self) -> str:
        return f"{self.role}-{self.rank}"

    @property
    def live(self) -> bool:
        return self.state == "alive"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "rank": self.rank,
            "address": self.address,
            "pid": self.pid,
            "host": self.host,
            "state": self.state,
            "last_heartbeat": round(self.last_heartbeat, 3),
            "stats": self.stats,
        }


def id_of(node: NodeRecord | None) -> str:
    return node.id if node is not None else "nobody"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (and is no zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
