"""A flood of ``pslm ctl`` requests: the scheduler writes its files once per turn of its loop,
not once per request (each write is two fsynced renames), so a flood neither holds the
heartbeats queued behind it back nor makes anyone look dead; and every reply still leaves
only after the change it tells of is on disk.

A real scheduler and server on 127.0.0.1 (``tests.test_scheduler_edges``); this process is
the worker, heartbeating, and the operator, pipelining its requests on one connection.
"""

from __future__ import annotations

import json
import time

from pslm.ps.control.persist import STATE_FILE
from pslm.ps.core.operator import FIELD
from pslm.ps.core.operator import read as read_operator
from pslm.wire.message import Message
from pslm.wire.transport import Channel
from tests.test_scheduler_edges import _ask, _cluster

REQUESTS = 300


def test_a_flood_of_ctl_requests_costs_few_writes_and_no_false_deaths(tmp_path) -> None:
    """300 ctl requests sent without waiting, while the worker and the server heartbeat:
    each is answered, in order, with its own version; the files are written fewer than a
    tenth as many times as requests came (before: twice a request); nobody is declared
    dead; and when a reply arrives the state file already holds its version."""
    with _cluster(tmp_path, 1) as (cluster, (worker,)):
        state = cluster.run_dir / STATE_FILE
        before = _ask(worker, "status").body
        start = time.time()
        operator = Channel(timeout=30.0, role="operator")
        credential = {FIELD: read_operator(cluster.run_dir)}
        operator.connect("scheduler", cluster.scheduler_address)
        kept: list[int] = []

        def on_reply(_: int, reply: Message) -> None:  # what a restarted scheduler would know
            newest = json.loads(state.read_text())["steering"][-1]["version"]
            kept.append(newest - reply.body["steering"]["version"])

        try:
            ids = [
                operator.send(
                    "scheduler", Message("ctl", body={"action": a, "values": {}, **credential})
                )
                for a in ["pause", "resume"] * (REQUESTS // 2)
            ]
            replies = operator.wait(ids, timeout=30.0, on_reply=on_reply)
        finally:
            operator.close()
        time.sleep(3 * 0.2)  # (a few heartbeats more, from both)
        after = _ask(worker, "status").body

    versions = [replies[i].body["steering"]["version"] for i in ids]
    first = before["steering"]["version"] + 1
    assert versions == list(range(first, first + REQUESTS))
    assert len(kept) == REQUESTS and min(kept) >= 0, "a reply came before its change was kept"
    writes = after["writes"] - before["writes"]
    assert 1 <= writes <= REQUESTS // 10, f"{writes} writes for {REQUESTS} requests"
    assert {n["id"]: n["state"] for n in after["nodes"]} == {
        "server-0": "alive",
        "worker-0": "alive",
    }
    assert all(n["last_heartbeat"] > start for n in after["nodes"])  # (still heartbeating)
    assert " is dead" not in (cluster.run_dir / "logs" / "scheduler.log").read_text()
