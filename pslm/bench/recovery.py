"""``pslm bench recovery``: how long the death of a worker or a server stalls training, and
what keeping a backup of every shard costs.

``pslm train`` runs the tiny model under BSP (2 servers with a backup each, 2 workers, the
default heartbeats: 1 s interval, 5 s timeout) on a synthetic text. Once it is under way, a
node is killed with SIGKILL; the time from the kill to the first step the cluster completes
with the failure handled (in ``metrics.jsonl``: a step whose share another worker trained, or
the first step with a ``failover``) is measured, and again once the cluster is whole, ``kills``
times: first worker 1, then the server of shard 0 or 1 in turn (its backup takes over; the
launcher's new process becomes the shard's new backup). The scheduler knows of a death when
the launcher's new process takes the dead one's rank (its predecessor's pid is gone) or after
the heartbeat timeout, whichever comes first. Goal: at most the heartbeat timeout + 2 s.

Replication cost: ``pslm bench train``'s pslm contender (GPT 4x4x128, 2 workers) with 2
servers, without and with backups, in turn, ``rounds`` times; medians. Goal: backups cost at
most 15% of tokens/s.
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
server_restarts = {kills}
"""
HEARTBEAT_TIMEOUT = 5.0


def run(*, quick: bool = False) -> dict[str, Any]:
    kills = 2 if quick else 5
    stalls = {role: _stalls(role, kills) for role in ("worker", "server")}
    cost = _replication_cost(quick)
    out: dict[str, Any] = {"bench": "recovery", "heartbeat_timeout_s": HEARTBEAT_TIMEOUT}
    for role, times in stalls.items():
        median = statistics.median(times)
        out[f"{role}_kill_to_next_step_s"] = [round(t, 2) for t in times]
        out[f"{role}_median_s"] = round(median, 2)
        out[f"{role}_met"] = median <= HEARTBEAT_TIMEOUT + 2.0
    out["goal_s"] = HEARTBEAT_TIMEOUT + 2.0
    out.update(cost)
    return out


def _stalls(role: str, kills: int) -> list[float]:
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
            return [_kill_and_time(run_dir, role, k % 2) for k in range(kills)]
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _replication_cost(quick: bool) -> dict[str, Any]:
    from pslm.bench import train as bt  # torch: only here

    steps = 30 if quick else 150
    rounds = 1 if quick else 3
    got: dict[int, list[float]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory(prefix="pslm-bench-replicas-") as tmp:
        data = bt._synthetic_data(Path(tmp) / "data")
        for r in range(rounds):
            for replicas in got:
                tps, _ = bt._pslm(
                    data, steps, Path(tmp) / f"r{replicas}-{r}", servers=2, replicas=replicas
                )
                got[replicas].append(tps)
    plain, backed = (statistics.median(got[k]) for k in (0, 1))
    return {
        "no_backups_tokens_per_s": round(plain),
        "backups_tokens_per_s": round(backed),
        "backups_cost": round(1 - backed / plain, 3),
        "backups_cost_met": 1 - backed / plain <= 0.15,
        "backup_rounds": {str(k): [round(v) for v in vs] for k, vs in got.items()},
        "backup_steps": steps,
    }


def _kill_and_time(run_dir: Path, role: str, shard: int, within: float = 180.0) -> float:
    """Wait until the cluster is whole, kill worker 1 or the server of ``shard``, and time
    the next completed step."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pid = _whole(run_dir, role, shard)
        if not pid:
            time.sleep(0.1)
            continue
        time.sleep(1.0)  # some steps with every node
        if pid != _whole(run_dir, role, shard):
            continue  # it changed meanwhile: look again
        try:
            os.kill(pid, signal.SIGKILL)
            break
        except ProcessLookupError:
            continue
    else:
        log = (run_dir / "logs" / "scheduler.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the cluster did not get whole again; scheduler log:\n{log}")
    killed = time.monotonic()
    seen = _lines(run_dir)
    while time.monotonic() < deadline:  # the first step the failure was handled for
        for rec in _records(run_dir)[seen:]:
            if ("failover" in rec) if role == "server" else rec["trained_by"] != [0, 1]:
                return time.monotonic() - killed
        time.sleep(0.01)
    raise RuntimeError("no step completed after the kill")


def _records(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(ln) for ln in lines if ln.endswith("}")]


def _whole(run_dir: Path, role: str, shard: int) -> int:
    """Once both workers hold their shares, every shard has its server and its backup, and
    steps advance: the pid of the node to kill (worker 1, or the server of ``shard``)."""
    try:
        doc = json.loads((run_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return 0
    if doc.get("leases", {}).get("holders") != [0, 1] or doc.get("leases", {}).get("moving"):
        return 0
    shards = doc.get("shards", [])
    if not shards or not all(s["primary"] and s["backup"] and s["synced"] for s in shards):
        return 0
    victim = "worker-1" if role == "worker" else shards[shard]["primary"]
    node = next((n for n in doc["nodes"] if n["id"] == victim and n["state"] == "alive"), None)
    return int(node["pid"]) if node is not None and _lines(run_dir) > 0 else 0


def _lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0
