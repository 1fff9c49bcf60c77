"""The local launcher leaves no process behind: normal exit, failures, Ctrl-C, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pslm.errors import LaunchError
from pslm.ps.launch.local import LocalCluster
from tests.conftest import REPO, alive, launch_config


def _all_gone(pids: list[int], within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_normal_exit_leaves_nothing_behind(tmp_path) -> None:
    lc = launch_config(tmp_path, worker="tests.workers:idle", worker_args={"steps": 20})
    with LocalCluster(lc) as cluster:
        cluster.wait(timeout=60)
        pids = cluster.pids
        codes = [c.proc.returncode for c in cluster.children]
    assert len(pids) == 5 and codes == [0] * 5  # they all exited by themselves, cleanly
    doc = json.loads((tmp_path / "run" / "cluster.json").read_text())
    assert {n["id"]: n["state"] for n in doc["nodes"]} == {
        "server-0": "exited",
        "server-1": "exited",
        "worker-0": "exited",
        "worker-1": "exited",
    }


def test_failing_worker_stops_the_cluster_with_its_error(tmp_path) -> None:
    lc = launch_config(tmp_path, worker="tests.workers:fail")
    with LocalCluster(lc) as cluster:
        with pytest.raises(LaunchError, match=r"worker-\d .*exited with code 1(.|\n)*on purpose"):
            cluster.wait(timeout=60)
        pids = cluster.pids
    assert _all_gone(pids)


def test_killed_server_stops_the_cluster(tmp_path) -> None:
    lc = launch_config(tmp_path, worker="tests.workers:idle", worker_args={"steps": 10**7})
    with LocalCluster(lc) as cluster:
        _wait_for_nodes(tmp_path / "run" / "cluster.json", 4)
        server = next(c for c in cluster.children if c.name == "server-0")
        os.kill(server.proc.pid, signal.SIGKILL)
        with pytest.raises(LaunchError, match="server-0 .*exited with code -9"):
            cluster.wait(timeout=60)
        pids = cluster.pids
    assert _all_gone(pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_or_killed_launcher_leaves_nothing_behind(tmp_path, sig) -> None:
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pslm", "demo", "--steps", str(10**7), "--run-dir", str(run)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        doc = _wait_for_nodes(run / "cluster.json", 4)
        pids = [doc["scheduler"]["pid"], *(n["pid"] for n in doc["nodes"])]
        assert all(alive(p) for p in pids)
        launcher.send_signal(sig)
        out, _ = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert _all_gone(pids), [p for p in pids if alive(p)]
    if sig == signal.SIGINT:
        assert launcher.returncode == 130, out.decode()
        assert b"Traceback" not in out


def _wait_for_nodes(path: Path, n: int, within: float = 60.0) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            doc = json.loads(path.read_text())
            if len(doc["nodes"]) == n:
                return doc
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} never listed {n} nodes")
