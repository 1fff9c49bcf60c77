"""pslm train --launcher ray: a Ray cluster runs the scheduler, servers and workers as actors;
a worker actor killed is started again by Ray and rejoins; the run completes; Ray's processes
are stopped afterwards. Ray binds the machine's own address, not loopback, so the test gives it
a network namespace of its own with loopback alone (its head then runs on 127.0.0.1). Skipped
without the ``ray`` extra, root or iproute2."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_train import CONFIG, _story

STEPS = 600
KILL = """
import sys
import ray
ray.init(address="auto", namespace="pslm-run", log_to_driver=False)
print("connected", flush=True)
sys.stdin.readline()   # the run is under way
ray.kill(ray.get_actor("pslm-worker-1"), no_restart=False)   # Ray starts it again
ray.shutdown()
"""


def _steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_a_killed_worker_actor_is_restarted_and_the_run_completes(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra: pip install 'pslm[ray]'")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("Ray gets a network namespace of its own here: that needs root and iproute2")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    ns = f"pslmray{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    inside = ["ip", "netns", "exec", ns]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        start = [ray_cli, "start", "--head", "--port", "6379", "--num-cpus", "8"]
        start += ["--include-dashboard", "false", "--disable-usage-stats"]
        subprocess.run([*inside, *start], check=True, capture_output=True, env=env, timeout=120)
        (tmp_path / "story.txt").write_text(_story())
        config = CONFIG.replace("steps = 30", f"steps = {STEPS}")
        (tmp_path / "tiny.toml").write_text(config.replace("interval = 10", "interval = 1000"))
        run = tmp_path / "run"
        train = subprocess.Popen(
            [
                *inside,
                sys.executable,
                "-m",
                "pslm",
                "train",
                "--config",
                str(tmp_path / "tiny.toml"),
                "--data",
                str(tmp_path / "story.txt"),
                "--run-dir",
                str(run),
                "--launcher",
                "ray",
                "--address",
                "auto",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        # the killer connects to Ray while the run starts (that takes seconds, in which a
        # tiny model trains hundreds of steps), so that the kill lands in the middle of the run
        killer = subprocess.Popen(
            [*inside, sys.executable, "-c", KILL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert killer.stdout is not None and killer.stdin is not None
            ready, _, _ = select.select([killer.stdout], [], [], 120)
            assert ready, "the killer did not connect to Ray within 120 s"
            assert killer.stdout.readline() == "connected\n", killer.communicate()[1]
            deadline = time.monotonic() + 120
            while _steps(run) < 30:
                assert train.poll() is None, train.communicate()[1]
                assert time.monotonic() < deadline, "no training under Ray"
                time.sleep(0.1)
            _, kill_err = killer.communicate("kill\n", timeout=60)
            assert killer.returncode == 0, kill_err
            _, err = train.communicate(timeout=300)
        finally:
            for proc in (killer, train):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert train.returncode == 0, err
    finally:
        subprocess.run([*inside, ray_cli, "stop", "--force"], capture_output=True, timeout=120)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(STEPS))  # every step once
    # worker 0 pushed worker 1's share meanwhile (for one clock at least: the new worker-1 may
    # join before the next, and the killed one may have pushed part of that clock already, so
    # the updates' ``trained_by`` need not show it)
    assert "took over share 1" in (run / "logs" / "worker-0.log").read_text()
    assert recs[-1]["trained_by"] == [0, 1]  # and the restarted worker 1 took it back
    assert "worker-1 joined late" in (run / "logs" / "scheduler.log").read_text()
    assert (run / "checkpoints" / f"step_{STEPS:07d}").is_dir()
    leftover = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True)
    assert leftover.returncode == 1, "Ray processes left behind"
