"""The parameter server, one plane per folder (``docs/architecture.md`` draws them):

    core/     what every node agrees on: key space, consistency, optimizer settings, protocol,
              the push header; no sockets, no threads
    control/  the scheduler and a node's side of it (register, heartbeats, the shard table)
    server/   one shard's process: intake, the BSP round, SSP/ASP, replies, replication
    client/   a worker's side: PSClient, encoding, failover, shared memory, readers
    launch/   local processes or Ray actors
    plan.py   the cost model behind ``pslm plan``

The public API, re-exported here and loaded on first use (the scheduler starts without torch):

    from pslm.ps import ClientConfig, LaunchConfig, LocalCluster, OptimizerConfig, PSClient
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ClientConfig": "pslm.ps.client.client",
    "Completion": "pslm.ps.client.client",
    "PSClient": "pslm.ps.client.client",
    "BucketPlan": "pslm.ps.client.exchange",
    "Exchange": "pslm.ps.client.exchange",
    "ParameterReader": "pslm.ps.client.reader",
    "Consistency": "pslm.ps.core.consistency",
    "KeySpace": "pslm.ps.core.keyspace",
    "OptimizerConfig": "pslm.ps.core.optim",
    "ScheduleConfig": "pslm.ps.core.optim",
    "PushHeader": "pslm.ps.core.push",
    "Steering": "pslm.ps.core.steering",
    "Scheduler": "pslm.ps.control.scheduler",
    "SchedulerConfig": "pslm.ps.control.scheduler",
    "Server": "pslm.ps.server.loop",
    "ServerConfig": "pslm.ps.server.loop",
    "LaunchConfig": "pslm.ps.launch.local",
    "LocalCluster": "pslm.ps.launch.local",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pslm.ps' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
