"""Chaos: kill -9 a random server, then a random worker, and so on, every few seconds while a
run trains (a bounded number of rounds); the run completes all its steps and ends where an
undisturbed one does."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_train import CONFIG, _story, _wait_for, metrics, pslm

STEPS = 80
KILLS = 4


def _whole(run: Path) -> dict[str, int]:
    """Once every worker holds its own share and every shard has its server and backup: the
    pids of the workers and of the shards' servers, by node id; else nothing."""
    try:
        doc = json.loads((run / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}
    leases, shards = doc.get("leases", {}), doc.get("shards", [])
    if leases.get("holders") != [0, 1] or leases.get("moving"):
        return {}
    if not shards or not all(s["primary"] and s["backup"] and s["synced"] for s in shards):
        return {}
    alive = {n["id"]: int(n["pid"]) for n in doc["nodes"] if n["state"] == "alive"}
    victims = ["worker-0", "worker-1", *(s["primary"] for s in shards)]
    return {v: alive[v] for v in victims} if all(v in alive for v in victims) else {}


@pytest.mark.slow  # (each kill on its own: tests/test_failures.py, in the default suite)
def test_chaos_kills_cost_nothing(tmp_path: Path) -> None:
    (tmp_path / "story.txt").write_text(_story())
    config = CONFIG.replace("steps = 30", f"steps = {STEPS}")
    config += (
        "\n[cluster]\nheartbeat_timeout = 2.0\nheartbeat_interval = 0.5\n"
        f"worker_restarts = {KILLS}\nserver_restarts = {KILLS}\n"
    )
    (tmp_path / "tiny.toml").write_text(config)
    args = ["train", "--config", str(tmp_path / "tiny.toml"), "--data", str(tmp_path / "story.txt")]
    whole = tmp_path / "whole"
    res = pslm(*args, "--run-dir", whole)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "chaos"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *args, "--run-dir", str(run), "--slow-worker", "1:30"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rng = random.Random(7)
    killed = []
    try:
        for _ in range(KILLS):
            pids = _wait_for(lambda: _whole(run), "the cluster to be whole")
            steps = len(metrics(run)) if (run / "metrics.jsonl").exists() else 0
            if steps >= STEPS - 15:
                break  # too near the end for another round
            time.sleep(rng.uniform(1.0, 3.0))
            kind = ("server", "worker")[len(killed) % 2]  # both kinds, a random one of each
            victim = rng.choice(sorted(v for v in pids if v.startswith(kind)))
            try:
                os.kill(pids[victim], signal.SIGKILL)
            except ProcessLookupError:  # it ended on its own meanwhile
                continue
            killed.append(victim)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert len(killed) >= 2, killed  # the run was long enough for some chaos
    assert {k.split("-")[0] for k in killed} == {"server", "worker"}, killed
    recs, want = metrics(run), metrics(whole)
    assert [r["step"] for r in recs] == list(range(STEPS))  # every step once
    final, undisturbed = recs[-1]["val_loss"], want[-1]["val_loss"]
    assert final == pytest.approx(undisturbed, rel=0.02)  # the goal; BSP in fact repeats exactly
    assert final == pytest.approx(undisturbed, rel=1e-5), killed
    sched = (run / "logs" / "scheduler.log").read_text()
    for victim in killed:
        assert f"{victim} is dead" in sched
