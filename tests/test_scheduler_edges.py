"""The scheduler at its edges: finalizes while the cluster stops, a registration with a pid no
process has or that died before the cluster filled, the share and the finalize of a worker that
dies, barriers whose members die or leave, a server that leaves mid-run (and a leave in its
name from elsewhere); and the launcher stopping a child still running after the job.

Real scheduler and server processes on 127.0.0.1; this test process is every worker (a
PSClient each). A test that speaks in a node's name says why.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from pslm.errors import RefusedError
from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.control.leases import Leases
from pslm.ps.core import operator
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.launch.local import Child, LocalCluster
from pslm.wire.message import Message
from pslm.wire.transport import Channel
from tests.conftest import launch_config

T = TypeVar("T")


@contextmanager
def _cluster(
    tmp_path: Path, workers: int, *, replicas: int = 0, init: bool = False
) -> Iterator[tuple[LocalCluster, list[PSClient]]]:
    """A scheduler and one server (and its backup with ``replicas``, not started again when
    it dies); this process is every worker, a client each, with ``{"w": zeros(4)}``
    initialised (SGD at learning rate 1, BSP) if ``init``."""
    lc = launch_config(
        tmp_path,
        num_servers=1,
        num_workers=workers,
        worker=None,
        replicas=replicas,
        server_restarts=0,
        heartbeat_interval=0.2,
        heartbeat_timeout=2.0,
    )

    def join(rank: int) -> PSClient:  # registration and init wait for every worker
        client = _client(cluster, rank)
        if init:
            client.init({"w": torch.zeros(4)}, OptimizerConfig(name="sgd", lr=1.0), shm=False)
        return client

    with LocalCluster(lc) as cluster, ThreadPoolExecutor(workers) as pool:
        clients = list(pool.map(join, range(workers)))
        try:
            yield cluster, clients
        finally:
            for client in clients:
                client.close(finalize=False)


def _client(cluster: LocalCluster, rank: int) -> PSClient:
    return PSClient(ClientConfig(scheduler=cluster.scheduler_address, rank=rank, timeout=10.0))


def _ask(client: PSClient, op: str, **body: Any) -> Message:
    """A request to the scheduler on ``client``'s connection: handled after everything the
    client sent before."""
    return client.channel.request("scheduler", Message(op, body=body))


def _operate(cluster: LocalCluster, op: str, **body: Any) -> Message:
    """A ``ctl`` or ``shutdown``, as ``pslm ctl`` sends it: as the operator, with the run's
    operator credential."""
    channel = Channel(timeout=10.0, role="operator")
    channel.connect("scheduler", cluster.scheduler_address)
    try:
        body[operator.FIELD] = operator.read(cluster.run_dir)
        return channel.request("scheduler", Message(op, body=body))
    finally:
        channel.close()


def _send(client: PSClient, op: str, **body: Any) -> int:
    """A request to the scheduler whose reply is waited for later; its id."""
    return client.channel.send("scheduler", Message(op, body=body))


def _states(cluster: LocalCluster) -> dict[str, str]:
    doc = json.loads((cluster.run_dir / "cluster.json").read_text())
    return {n["id"]: n["state"] for n in doc["nodes"]}


def _joined(cluster: LocalCluster, name: str) -> bool | None:
    """True once server ``name`` logged its membership: from then on, Ctrl-C makes it leave
    (before, it does not know its own name yet, and its silence makes it dead)."""
    path = cluster.run_dir / "logs" / f"{name}.log"
    return True if path.exists() and " listening on " in path.read_text() else None


def _until(check: Callable[[], T | None], what: str, within: float = 30.0) -> T:
    """Ask ``check`` (a round trip to the cluster) again until it has an answer."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        answer = check()
        if answer is not None:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- finalize -----------------------------------------------------------------------------


def test_finalizes_are_answered_when_the_cluster_stops(tmp_path) -> None:
    """Worker 1 finalizes and waits for worker 0; the cluster is told to shut down; then worker
    0 finalizes before a heartbeat told it of the stop (its heartbeats end here, to hold that
    window open). Neither is left waiting for a reply until its close() times out."""
    with _cluster(tmp_path, 2) as (cluster, (w0, w1)):
        waiting = _send(w1, "finalize", node="worker-1")
        _ask(w1, "status")  # (the finalize is in)
        w0.heartbeat.close()
        _operate(cluster, "shutdown")
        w1.channel.wait([waiting], timeout=5.0)
        w0.close()  # its finalize
        cluster.wait(timeout=30)
        assert cluster.children[0].proc.returncode == 0  # the scheduler
    assert _states(cluster) == {"server-0": "exited", "worker-0": "exited", "worker-1": "exited"}


def test_a_registration_with_a_pid_no_process_has_is_refused(tmp_path) -> None:
    """pid 2**40 made later joins fail (OverflowError where the scheduler checks that a node's
    process runs), 0 and -1 made the node look alive for ever (os.kill signals a process
    group then): refused; the scheduler stays up and the cluster fills as usual."""
    lc = launch_config(tmp_path, num_servers=1, num_workers=1, worker=None)
    with LocalCluster(lc) as cluster:
        channel = Channel(timeout=5.0, role="worker")
        channel.connect("scheduler", cluster.scheduler_address)
        try:
            for pid in (2**40, 2**31, 0, -1):
                body = {
                    "role": "worker",
                    "rank": -1,
                    "address": "",
                    "pid": pid,
                    "host": socket.gethostname(),
                }
                with pytest.raises(RefusedError, match=f"pid {pid} is not a process id"):
                    channel.request("scheduler", Message("register", body=body))
        finally:
            channel.close()
        client = _client(cluster, -1)
        assert client.rank == 0
        client.close()
        cluster.wait(timeout=30)


def test_a_node_that_dies_before_the_cluster_fills_gives_its_rank_to_its_restart(
    tmp_path,
) -> None:
    """Worker 0 registers and its process dies while the cluster is still filling (a
    short-lived process stands for it; the registration is what a worker sends); its restart
    asks for rank 0 again and gets it, and the cluster fills with the live one. The dead
    registration used to keep the rank: every restart was refused as "already taken"."""
    lc = launch_config(tmp_path, num_servers=1, num_workers=2, worker=None)
    with LocalCluster(lc) as cluster:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        channel = Channel(timeout=5.0, role="worker")
        channel.connect("scheduler", cluster.scheduler_address)
        try:
            body = {"role": "worker", "rank": 0, "address": "", "pid": gone.pid}
            channel.send(
                "scheduler", Message("register", body={**body, "host": socket.gethostname()})
            )
            channel.request("scheduler", Message("status"))  # (handled after the register)
            with ThreadPoolExecutor(2) as pool:
                clients = list(pool.map(lambda r: _client(cluster, r), (0, 1)))
        finally:
            channel.close()
        assert [c.rank for c in clients] == [0, 1]
        doc = json.loads((cluster.run_dir / "cluster.json").read_text())
        pids = {n["id"]: n["pid"] for n in doc["nodes"]}
        assert pids["worker-0"] == pids["worker-1"] == os.getpid()  # (this process is both)
        with ThreadPoolExecutor(2) as pool:  # (a close waits for every worker's)
            list(pool.map(PSClient.close, clients))
        cluster.wait(timeout=30)
    log = (cluster.run_dir / "logs" / "scheduler.log").read_text()
    assert f"pid {gone.pid}" in log and "is gone" in log


# --- workers that die ---------------------------------------------------------------------


def test_a_dead_workers_share_goes_to_a_worker_still_training(tmp_path) -> None:
    """Worker 0 pushes its share of the last clock and finalizes; worker 1 dies before
    pushing its own. Its share goes to worker 2, which pushes it, and the clock is applied.
    (Given to worker 0, with the fewest shares and the lowest rank, it was never pushed.)"""
    with _cluster(tmp_path, 3, init=True) as (cluster, (w0, w1, w2)):
        ones = {"w": torch.ones(4)}
        w0.wait(w0.push(ones, clock=0))
        finalized = _send(w0, "finalize", node="worker-0")
        w2.wait(w2.push(ones, clock=0))
        w1.close(finalize=False)  # dies: its heartbeats stop

        def moved() -> Leases | None:
            leases = w2.leases()
            return leases if leases.holders[1] != 1 else None

        assert _until(moved, "worker 1's share to move").holders == (0, 2, 2)
        w2.wait(w2.push(ones, clock=0, share=1))
        out = {"w": torch.zeros(4)}
        assert w2.wait(w2.pull(out, version=1)).version == 1
        assert torch.equal(out["w"], -torch.ones(4))  # the mean of the three shares' ones
        w2.close()
        w0.channel.wait([finalized], timeout=5.0)
        cluster.wait(timeout=30)


def test_the_finalize_of_a_worker_that_died_is_not_its_successors(tmp_path) -> None:
    """Worker 1 finalizes, then dies; a new worker takes its rank and, at a clock boundary,
    its share. When worker 0 finalizes, the job goes on until the new worker 1 finalizes too:
    the dead one's finalize does not count for it (it stopped the cluster, the new worker
    marked exited while it was training)."""
    with _cluster(tmp_path, 2) as (cluster, (w0, w1)):
        _send(w1, "finalize", node="worker-1")
        _ask(w1, "status")  # (the finalize is in)
        w1.close(finalize=False)  # dies waiting for the reply
        again = _client(cluster, 1)  # registered once worker 1 is declared dead
        try:
            assert again.late and w0.leases().moving == {1: 1}
            assert w0.release(1, clock=0).holders == (0, 1)
            finalized = _send(w0, "finalize", node="worker-0")
            nodes = _ask(w0, "status").body["nodes"]
            assert {n["id"]: n["state"] for n in nodes}["worker-1"] == "alive"
            again.close()
        finally:
            again.close(finalize=False)
        w0.channel.wait([finalized], timeout=5.0)
        cluster.wait(timeout=30)
    assert _states(cluster)["worker-1"] == "exited"


# --- barriers -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["killed", "interrupted"])
def test_a_server_that_dies_or_leaves_is_not_waited_for_at_a_barrier(tmp_path, how) -> None:
    """A barrier of the group "all": worker 0 and server 0 arrive, then the backup server 1
    is killed (declared dead) or interrupted (it leaves): the barrier is released without it.
    Servers take no barriers in pslm, so the test arrives in server 0's name."""
    with _cluster(tmp_path, 1, replicas=1) as (cluster, (w0,)):
        arrived = [
            _send(w0, "barrier", node=node, name="b", group="all", values={"one": 1.0})
            for node in ("worker-0", "server-0")
        ]
        _ask(w0, "status")  # (the barrier began: server 1 is one of its members)
        backup = next(c for c in cluster.children if c.name == "server-1")
        _until(lambda: _joined(cluster, "server-1"), "server 1 to take its membership")
        os.kill(backup.proc.pid, signal.SIGKILL if how == "killed" else signal.SIGINT)
        replies = w0.channel.wait(arrived, timeout=15.0)
        assert [r.body["values"] for r in replies.values()] == [{"one": 2.0}] * 2
        assert backup.proc.wait(10) == (-signal.SIGKILL if how == "killed" else 130)
        w0.close()
        cluster.wait(timeout=30)
    assert _states(cluster)["server-1"] == ("dead" if how == "killed" else "exited")


def _synced_shard(cluster: LocalCluster) -> dict[str, Any] | None:
    """Shard 0's entry in cluster.json once its backup holds a whole copy; else None."""
    doc = json.loads((cluster.run_dir / "cluster.json").read_text())
    shard = doc["shards"][0] if doc.get("shards") else None
    return shard if shard is not None and shard["backup"] and shard["synced"] else None


def test_a_server_that_leaves_mid_run_is_replaced_by_its_backup(tmp_path) -> None:
    """Ctrl-C on a shard's server while the job runs (it leaves, as a server does on an
    unhandled error): its backup serves the shard at once, as after a death, and the worker's
    next push_pull is answered there with nothing lost. It used to be marked as exited and
    kept in the shard table: the backup was never promoted and the worker's request timed out."""
    with _cluster(tmp_path, 1, replicas=1, init=True) as (cluster, (w0,)):
        _until(lambda: _synced_shard(cluster), "the backup's copy")
        grads, out = {"w": torch.ones(4)}, {"w": torch.zeros(4)}
        for clock in range(3):
            w0.wait(w0.push_pull(grads, out, clock=clock))
        primary = next(c for c in cluster.children if c.name == "server-0")
        os.kill(primary.proc.pid, signal.SIGINT)
        assert primary.proc.wait(10) == 130
        grads["w"].fill_(2.0)
        w0.wait(w0.push_pull(grads, out, clock=3), timeout=8.0)  # (an exited node: no health check)
        assert out["w"].tolist() == [-5.0] * 4  # SGD, learning rate 1: -(1 + 1 + 1 + 2)
        doc = json.loads((cluster.run_dir / "cluster.json").read_text())
        assert doc["shards"][0]["primary"] == "server-1"  # (and no backup: none restarts)
        assert _states(cluster)["server-0"] == "exited"
        w0.close()
        cluster.wait(timeout=30)
    log = (cluster.run_dir / "logs" / "scheduler.log").read_text()
    assert "server-0 left while the job runs" in log


def test_a_leave_in_a_servers_name_from_another_process_is_ignored(tmp_path) -> None:
    """A leave that names server 0 but comes from another connection than the one it
    registered on (a process that a restarted one replaced, or anyone who knows the name) is
    ignored: server 0 stays the shard's server and the job goes on. Taken as server 0's own
    leave, it would have lost the shard (no backup) and stopped the job."""
    with _cluster(tmp_path, 1, init=True) as (cluster, (w0,)):
        channel = Channel(timeout=5.0, role="server")
        channel.connect("scheduler", cluster.scheduler_address)
        try:
            channel.request("scheduler", Message("leave", body={"node": "server-0"}))
        finally:
            channel.close()
        out = {"w": torch.zeros(4)}
        w0.wait(w0.push_pull({"w": torch.ones(4)}, out, clock=0))
        assert out["w"].tolist() == [-1.0] * 4 and _states(cluster)["server-0"] == "alive"
        w0.close()
        cluster.wait(timeout=30)
    log = (cluster.run_dir / "logs" / "scheduler.log").read_text()
    assert "server-0: a leave from another process than the one registered: ignored" in log


def test_a_removed_worker_that_leaves_is_not_waited_for_at_a_barrier(tmp_path) -> None:
    """Worker 0 arrives at a barrier of both workers; worker 1 is removed (pslm ctl
    remove-worker), hands its share over and leaves: the barrier is released without it."""
    with _cluster(tmp_path, 2) as (cluster, (w0, w1)):
        for client in (w0, w1):
            client.report("shares_move", 1.0)  # (as the training loop says under BSP)
        arrived = _send(w0, "barrier", node="worker-0", name="b", group="workers")

        def remove() -> dict[str, Any] | None:
            try:
                return _operate(cluster, "ctl", action="remove-worker", node="worker-1").body
            except RefusedError as exc:  # until a heartbeat brought shares_move
                if "has not reported" not in str(exc):
                    raise
                return None

        assert _until(remove, "worker 1's removal")["moves"] == {"1": 0}
        assert w1.release(1, clock=0).holders == (0, 0)
        w1.close()  # its finalize: it leaves
        w0.channel.wait([arrived], timeout=5.0)
        w0.close()
        cluster.wait(timeout=30)
    assert _states(cluster) == {"server-0": "exited", "worker-0": "exited", "worker-1": "exited"}


# --- the launcher -------------------------------------------------------------------------


@pytest.mark.slow  # (waits out the launcher's grace of heartbeat timeout + 10 s)
def test_a_child_still_running_after_the_job_is_stopped(tmp_path) -> None:
    """A process of the cluster that does not exit after the job (one that sleeps, in the
    place of a hung server) is stopped by ``wait``, as its warning says; the job succeeds."""
    lc = launch_config(
        tmp_path,
        worker="tests.workers:idle",
        worker_args={"steps": 2},
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
    )
    with LocalCluster(lc) as cluster:
        log_path = tmp_path / "hung.log"
        with open(log_path, "wb") as out:
            hung = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        cluster.children.append(Child("server", 2, hung, log_path))
        cluster.wait(timeout=60)
        assert hung.poll() == -signal.SIGTERM
        codes = [c.proc.returncode for c in cluster.children if c.proc is not hung]
    assert codes == [0] * 5


def test_a_stray_request_to_a_backup_does_not_promote_it(tmp_path) -> None:
    """A pull sent straight to shard 0's backup (a confused or malicious member) is held, not
    taken as a sign that the backup serves the shard now: training goes on with the backup
    still the backup and in sync. Once the shard table promotes it (its server leaves), it
    serves the shard - and answers the held pull. The backup used to promote itself on any
    worker's request: its server's next update was refused, the backup dropped, and
    replication was gone for the rest of the run."""
    with _cluster(tmp_path, 1, replicas=1, init=True) as (cluster, (w0,)):
        _until(lambda: _synced_shard(cluster), "the backup's copy")
        backup = _ask(w0, "status").body["backups"][0]
        channel = Channel(timeout=10.0, role="worker")
        channel.connect("backup", backup)
        try:
            stray = channel.send("backup", Message("pull", body={"worker": 0}))
            grads, out = {"w": torch.ones(4)}, {"w": torch.zeros(4)}
            for clock in range(3):
                w0.wait(w0.push_pull(grads, out, clock=clock))
            status = _ask(w0, "status").body
            assert status["backups"][0] == backup and status["servers"][0] != backup
            assert _synced_shard(cluster) is not None  # (still a whole copy)
            primary = next(c for c in cluster.children if c.name == "server-0")
            os.kill(primary.proc.pid, signal.SIGINT)
            assert primary.proc.wait(10) == 130
            reply = channel.wait([stray], timeout=10.0)[stray]
            assert reply.body["version"] == 3 and reply.tensors[0].tolist() == [-3.0] * 4
        finally:
            channel.close()
        w0.close()
        cluster.wait(timeout=30)
