"""What the scheduler keeps on disk: ``cluster.json`` (the live cluster, for people and
launchers) and the state a restarted scheduler takes over (``--recover``).

    write_files(run_dir, cluster_doc, kept)    # atomically; a failure is logged, not raised
    kept = Kept.load(Path(run_dir) / STATE_FILE)   # ConfigError if it cannot be read
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError
from pslm.files import write_atomic
from pslm.ps.control.leases import ShareLeases
from pslm.ps.control.records import NodeRecord
from pslm.ps.control.table import ShardTable
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.steering import SteeringLog

log = logging.getLogger("pslm.scheduler")

STATE_FILE = "scheduler-state.json"
"""In the run directory: what a restarted scheduler takes over (``--recover``)."""


@dataclass(kw_only=True, slots=True)
class Kept:
    """What a restarted scheduler needs and cannot learn from the nodes."""

    nodes: dict[str, NodeRecord]
    leases: ShareLeases
    shards: ShardTable[NodeRecord]
    keyspace: KeySpace | None
    declared_by: str
    released: dict[str, dict[str, float]]
    """The last barriers' sums (a latecomer's answer survives a restart)."""
    stopping: bool
    steering: SteeringLog

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [
                {**n.to_json(), "requested_rank": n.requested_rank} for n in self.nodes.values()
            ],
            "leases": self.leases.to_dict(),
            "shards": self.shards.to_state(),
            "keyspace": self.keyspace.to_dict() if self.keyspace is not None else None,
            "declared_by": self.declared_by,
            "released": self.released,
            "stopping": self.stopping,
            "steering": self.steering.to_dict(),
        }

    @classmethod
    def load(cls, path: Path) -> Kept:
        """What a scheduler kept at ``path``; ConfigError if it cannot be read. The nodes
        count as just seen, their connections unknown until they send something."""
        try:
            doc = json.loads(path.read_text())
            now = time.monotonic()
            nodes = {}
            for raw in doc["nodes"]:
                node = NodeRecord(
                    role=str(raw["role"]),
                    requested_rank=int(raw["requested_rank"]),
                    address=str(raw["address"]),
                    pid=int(raw["pid"]),
                    host=str(raw["host"]),
                    peer=b"",  # known again once it sends something
                    rank=int(raw["rank"]),
                    state=str(raw["state"]),
                    last_seen=now,
                )
                nodes[node.id] = node
            keyspace = doc["keyspace"]
            return cls(
                nodes=nodes,
                leases=ShareLeases.from_dict(doc["leases"]),
                shards=ShardTable.from_state(doc["shards"], nodes),
                keyspace=KeySpace.from_dict(keyspace) if keyspace is not None else None,
                declared_by=str(doc["declared_by"]) if keyspace is not None else "",
                released={str(k): dict(v) for k, v in doc["released"].items()},
                stopping=bool(doc.get("stopping")),
                steering=SteeringLog.start(doc.get("steering")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot recover the cluster from {path}: {exc!r}") from None


def write_files(run_dir: str, cluster: dict[str, Any], kept: Kept | None) -> None:
    """``cluster.json`` and (``kept``: once the cluster is complete) the state file, each
    written atomically. The files inform and recover; failing to write them must not stop the
    cluster: logged."""
    try:
        write_atomic(Path(run_dir) / "cluster.json", json.dumps(cluster, indent=2) + "\n")
        if kept is not None:
            write_atomic(Path(run_dir) / STATE_FILE, json.dumps(kept.to_dict()))
    except OSError as exc:
        log.warning("cannot write cluster.json: %s", exc)
