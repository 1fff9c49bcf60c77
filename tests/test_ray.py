"""pslm train --launcher ray: a Ray cluster runs the scheduler, servers and workers as actors;
a worker actor killed is started again by Ray and rejoins; the run completes; Ray's processes
are stopped afterwards. Ray binds the machine's own address, not loopback, so the test gives it
a network namespace of its own with loopback alone (its head then runs on 127.0.0.1). Skipped
without the ``ray`` extra, root or iproute2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_train import CONFIG, _story

STEPS = 400
KILL = """
import ray
ray.init(address="auto", namespace="pslm-run", log_to_driver=False)
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
        try:
            deadline = time.monotonic() + 120
            while _steps(run) < 30:
                assert train.poll() is None, train.communicate()[1]
                assert time.monotonic() < deadline, "no training under Ray"
                time.sleep(0.1)
            kill = subprocess.run(
                [*inside, sys.executable, "-c", KILL], capture_output=True, text=True, env=env
            )
            assert kill.returncode == 0, kill.stderr
            _, err = train.communicate(timeout=300)
        finally:
            if train.poll() is None:
                train.kill()
                train.wait()
        assert train.returncode == 0, err
    finally:
        subprocess.run([*inside, ray_cli, "stop", "--force"], capture_output=True, timeout=120)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(STEPS))  # every step once
    assert any(r["trained_by"] == [0, 0] for r in recs)  # worker 0 trained its share meanwhile
    assert recs[-1]["trained_by"] == [0, 1]  # and the restarted worker 1 took it back
    assert "worker-1 joined late" in (run / "logs" / "scheduler.log").read_text()
    assert (run / "checkpoints" / f"step_{STEPS:07d}").is_dir()
    leftover = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True)
    assert leftover.returncode == 1, "Ray processes left behind"
