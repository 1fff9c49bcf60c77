"""The shard table: which server serves each shard (its primary) and which keeps its backup.

    table = ShardTable(num_shards=2)      # the scheduler's, of its node records
    table.place(0, node)                  # server of shard 0 if it has none, else its backup
    table.promote(0)                      # its server died: the backup serves it
    Table.from_body(heartbeat_reply.body) # what a node learns of it, with every heartbeat

The table has a version that grows with every change; nodes follow it through their
heartbeats (``pslm.ps.control.node``): servers to take a shard over or to find a new backup,
workers to send a shard's requests to its new server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class Node(Protocol):
    """What the table needs of a scheduler's node record."""

    @property
    def id(self) -> str: ...
    @property
    def live(self) -> bool: ...
    @property
    def address(self) -> str: ...
    @property
    def pid(self) -> int: ...


N = TypeVar("N", bound=Node)


class ShardTable(Generic[N]):
    """Which server node serves each shard (primary) and which keeps its backup."""

    def __init__(self, num_shards: int):
        self.primary: list[N | None] = [None] * num_shards
        self.backup: list[N | None] = [None] * num_shards
        self.synced = [False] * num_shards
        """Whether the shard's server reported its backup holds a whole copy (only such a
        backup is promoted)."""
        self.lost: list[int] = []
        """Shards whose server died with no synced backup: their updates since the last
        checkpoint are gone."""
        self.version = 0

    def place(self, shard: int, node: N) -> None:
        """``node`` serves ``shard`` if it has no server yet, else backs it up."""
        if self.primary[shard] is None:
            self.primary[shard] = node
        else:
            self.backup[shard] = node
            self.synced[shard] = False
        self.version += 1

    def role_of(self, node_id: str) -> tuple[int, bool]:
        """(shard, whether primary) of a server node; (-1, True) for any other node."""
        for s, (p, b) in enumerate(zip(self.primary, self.backup, strict=True)):
            if p is not None and p.id == node_id and p.live:
                return s, True
            if b is not None and b.id == node_id and b.live:
                return s, False
        return -1, True

    def promote(self, shard: int) -> bool:
        """Make the shard's live, synced backup its server; False if it has none."""
        b = self.backup[shard]
        if b is None or not b.live or not self.synced[shard]:
            return False
        self.primary[shard], self.backup[shard] = b, None
        self.synced[shard] = False
        return True

    def drop_backup(self, shard: int) -> None:
        self.backup[shard] = None
        self.synced[shard] = False
        self.version += 1

    def without_backup(self) -> int | None:
        """A shard whose server is live and that has no live backup, if any."""
        for s, (p, b) in enumerate(zip(self.primary, self.backup, strict=True)):
            if p is not None and p.live and (b is None or not b.live):
                return s
        return None

    def to_state(self) -> dict[str, Any]:
        def ref(n: N | None) -> list[Any] | None:  # a node id is reused: its pid tells apart
            return [n.id, n.pid] if n is not None else None

        return {
            "version": self.version,
            "primary": [ref(p) for p in self.primary],
            "backup": [ref(b) for b in self.backup],
            "synced": list(self.synced),
            "lost": list(self.lost),
        }

    @classmethod
    def from_state(cls, raw: dict[str, Any], nodes: Mapping[str, N]) -> ShardTable[N]:
        def node(ref: Any) -> N | None:
            if ref is None or ref[0] not in nodes or nodes[ref[0]].pid != ref[1]:
                return None
            return nodes[ref[0]]

        table = cls(len(raw["primary"]))
        table.primary = [node(r) for r in raw["primary"]]
        table.backup = [node(r) for r in raw["backup"]]
        table.synced = [bool(x) for x in raw["synced"]]
        table.lost = [int(x) for x in raw["lost"]]
        table.version = int(raw["version"]) + 1
        return table

    def to_body(self) -> dict[str, Any]:
        """What membership and heartbeat replies carry (``pslm.ps.control.table.Table``)."""
        return {
            "table": self.version,
            "servers": [p.address if p is not None else "" for p in self.primary],
            "backups": [b.address if b is not None and b.live else "" for b in self.backup],
        }

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "primary": p.id if p else None,
                "backup": b.id if b and b.live else None,
                "synced": synced,
            }
            for p, b, synced in zip(self.primary, self.backup, self.synced, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class Table:
    """The shard table: which server serves each shard and which keeps its backup. Its
    ``version`` grows with every change (a backup promoted, a new backup)."""

    version: int
    servers: tuple[str, ...]
    """Address of each shard's primary."""
    backups: tuple[str, ...]
    """Address of each shard's backup, "" where there is none."""

    @classmethod
    def from_body(cls, body: dict[str, object]) -> Table | None:
        """The table a heartbeat reply carries, or None if it carries none (or a bad one)."""
        version, servers, backups = body.get("table"), body.get("servers"), body.get("backups")
        if not isinstance(version, int) or isinstance(version, bool):
            return None
        if not isinstance(servers, list) or not isinstance(backups, list):
            return None
        if len(servers) != len(backups) or not all(
            isinstance(a, str) for a in [*servers, *backups]
        ):
            return None
        return cls(version, tuple(servers), tuple(backups))
