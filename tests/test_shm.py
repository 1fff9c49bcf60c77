"""Shared memory between a worker and a server on one machine (``pslm.wire.shm``): what a peer
maps, and what it refuses to map."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pslm.errors import ProtocolError
from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.launch.local import LocalCluster
from pslm.wire.shm import Segment, attach, boot_id
from tests.conftest import launch_config

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs Linux memfd")


def test_a_peer_process_sees_and_writes_the_same_memory() -> None:
    seg = Segment.create(1000, tag="t")
    try:
        seg.tensor[:] = torch.arange(1000, dtype=torch.float32)
        code = (
            "import json, sys, torch; from pslm.wire.shm import attach; "
            "t = attach(json.loads(sys.argv[1]), min_numel=1000); "
            "print(float(t.sum())); t[:10] = -1.0"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(seg.describe())],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert float(out) == float(sum(range(1000)))  # it read what this process wrote
        assert torch.equal(seg.tensor[:10], torch.full((10,), -1.0))  # and wrote back here
        assert torch.equal(seg.tensor[10:], torch.arange(10, 1000, dtype=torch.float32))
    finally:
        seg.close()


def test_the_owner_cannot_shrink_a_segment_under_its_peers() -> None:
    seg = Segment.create(16, tag="t")
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 4)
    finally:
        seg.close()


@pytest.mark.parametrize(
    "change, why",
    [
        ({"name": "pslm-t-0000000000000000"}, "is not the segment"),
        ({"name": "other"}, "not a pslm segment"),
        ({"boot": "another-boot"}, "on another machine"),
        ({"numel": 8}, "8 values, 16 needed"),
        ({"numel": 32}, "not 32 values long"),
        ({"fd": 99999}, "cannot open"),
        ({"pid": -1}, "non-negative integers"),
        ({"fd": True}, "non-negative integers"),
    ],
)
def test_a_description_that_does_not_hold_up_is_refused(change, why) -> None:
    seg = Segment.create(16, tag="t")
    try:
        with pytest.raises(ProtocolError, match=why):
            attach({**seg.describe(), **change}, min_numel=16)
        assert torch.equal(attach(seg.describe(), min_numel=16), seg.tensor)  # the real one maps
    finally:
        seg.close()


def test_memory_that_is_not_sealed_is_refused() -> None:
    fd = os.memfd_create("pslm-t-unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 64)
        desc = {"pid": os.getpid(), "fd": fd, "name": "pslm-t-unsealed", "numel": 16}

        with pytest.raises(ProtocolError, match="not sealed"):
            attach({**desc, "boot": boot_id()}, min_numel=16)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)  # shrink alone is not enough
        with pytest.raises(ProtocolError, match="not sealed"):
            attach({**desc, "boot": boot_id()}, min_numel=16)
    finally:
        os.close(fd)


def test_a_description_that_is_not_a_map_is_refused() -> None:
    with pytest.raises(ProtocolError, match="must be a map"):
        attach([1, 2, 3], min_numel=1)


def _primary_pid(run: Path) -> int:
    """The pid of shard 0's server once its backup is in sync; else 0."""
    try:
        doc = json.loads((run / "cluster.json").read_text())
    except (OSError, ValueError):
        return 0
    shard = (doc.get("shards") or [{}])[0]
    if not (shard.get("primary") and shard.get("backup") and shard.get("synced")):
        return 0
    return next(
        (
            int(n["pid"])
            for n in doc["nodes"]
            if n["id"] == shard["primary"] and n["state"] == "alive"
        ),
        0,
    )


def test_pushes_left_in_shared_memory_reach_the_backup_that_takes_over(tmp_path) -> None:
    """Two workers' push_pulls are in flight through shared memory when the server dies: the
    backup that takes the shard over (a process that never mapped their memory) gets them
    over the socket, and the update is the one the dead server would have made. A third
    worker pushes only after the kill, so the server cannot have completed the clock before
    it died (with two workers it could: under load the pushes came after the backup's sync, the
    server answered them, and the kill came after; seen once in a full CI run)."""
    lc = launch_config(
        tmp_path,
        num_servers=1,
        replicas=1,
        num_workers=3,
        worker=None,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
    )
    start = torch.randn(64, 64)
    grads = [torch.randn(64, 64) for _ in range(3)]
    in_flight = threading.Barrier(4, timeout=60)
    results: dict[int, Any] = {}

    def worker(rank: int) -> None:
        try:
            cfg = ClientConfig(scheduler=cluster.scheduler_address, rank=rank, timeout=60)
            with PSClient(cfg) as client:
                client.init({"w": start.clone()}, OptimizerConfig(name="sgd", lr=1.0))
                assert client.memory is not None and client.memory.active == {0}
                out = {"w": torch.zeros(64, 64)}
                if rank < 2:
                    ts = client.push_pull({"w": grads[rank]}, out, clock=0)
                in_flight.wait()
                in_flight.wait()  # the server is dead now
                if rank == 2:
                    ts = client.push_pull({"w": grads[rank]}, out, clock=0)
                results[rank] = (client.wait(ts).version, out["w"], client.memory.exchanges)
        except BaseException as exc:
            results[rank] = exc
            in_flight.abort()

    with LocalCluster(lc) as cluster:
        threads = [threading.Thread(target=worker, args=(r,)) for r in range(3)]
        for t in threads:
            t.start()
        in_flight.wait()
        deadline = time.monotonic() + 60
        while not (pid := _primary_pid(Path(lc.run_dir))) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the cluster file the scheduler rewrites
        assert pid, "no synced backup within 60 s"
        os.kill(pid, signal.SIGKILL)
        in_flight.wait()
        for t in threads:
            t.join(timeout=120)
    for rank in range(3):
        assert not isinstance(results[rank], BaseException), results[rank]
        version, values, exchanges = results[rank]
        assert version == 1
        assert exchanges == 1 or rank == 2  # (the third may find the server gone first)
        torch.testing.assert_close(values, start - sum(grads) / 3, rtol=0, atol=1e-6)
    log = (Path(lc.run_dir) / "logs" / "scheduler.log").read_text()
    assert "its backup server-1 serves it now" in log or "its backup server-0 serves it now" in log
