"""``pslm bench recovery``: how long the death of a worker stalls training.

``pslm train`` runs the tiny model under BSP (2 servers, 2 workers, the default heartbeats: 1 s
interval, 5 s timeout) on a synthetic text. Once it is under way, worker 1 is killed with
SIGKILL; the time from the kill to the next step the cluster completes (a new line in
``metrics.jsonl``) is measured, and again after every rejoin, ``kills`` times. The other
worker takes the dead one's share as soon as the scheduler knows it is dead: when the
launcher's new process takes its rank (its predecessor's pid is gone) or after the heartbeat
timeout, whichever comes first. Goal: at most the heartbeat timeout + 2 s.

Server failures are not measured: servers cannot fail yet without failing the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = """
[model]
preset = "tiny"
block_size = 32
[data]
tokenizer = "char"
[train]
steps = 1000000
batch_size = 8
eval_interval = 1000000
checkpoint_interval = 1000000
sample_tokens = 0
[cluster]
worker_restarts = {kills}
"""
HEARTBEAT_TIMEOUT = 5.0


def run(*, quick: bool = False) -> dict[str, Any]:
    kills = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="pslm-recovery-") as tmp:
        root = Path(tmp)
        rng = random.Random(0)
        words = "the a king queen river stone light dark walked spoke softly".split()
        (root / "story.txt").write_text(
            "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000))
        )
        (root / "tiny.toml").write_text(CONFIG.format(kills=kills))
        run_dir = root / "run"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pslm", "train", "--config", str(root / "tiny.toml")]
            + ["--data", str(root / "story.txt"), "--run-dir", str(run_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            stalls = [_kill_and_time(run_dir) for _ in range(kills)]
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    median = statistics.median(stalls)
    return {
        "bench": "recovery",
        "worker_kill_to_next_step_s": [round(s, 2) for s in stalls],
        "worker_median_s": round(median, 2),
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT,
        "goal_s": HEARTBEAT_TIMEOUT + 2.0,
        "met": median <= HEARTBEAT_TIMEOUT + 2.0,
    }


def _kill_and_time(run_dir: Path, within: float = 180.0) -> float:
    """Wait until both workers train, kill worker 1, and time the next completed step."""
    deadline = time.monotonic() + within
    pid = 0
    while time.monotonic() < deadline:
        pid = _both_training(run_dir)
        if pid:
            break
        time.sleep(0.1)
    if not pid:
        raise RuntimeError("the cluster did not get going")
    seen = _lines(run_dir)
    time.sleep(1.0)  # some steps with both workers
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    seen = _lines(run_dir)
    while time.monotonic() < deadline:
        if _lines(run_dir) > seen:
            return time.monotonic() - killed
        time.sleep(0.01)
    raise RuntimeError("no step completed after the kill")


def _both_training(run_dir: Path) -> int:
    """Worker 1's pid once it holds its share again and steps advance; else 0."""
    try:
        doc = json.loads((run_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return 0
    if doc.get("leases", {}).get("holders") != [0, 1] or doc.get("leases", {}).get("moving"):
        return 0
    node = next((n for n in doc["nodes"] if n["id"] == "worker-1" and n["state"] == "alive"), None)
    return int(node["pid"]) if node is not None and _lines(run_dir) > 0 else 0


def _lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0
