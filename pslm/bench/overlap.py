"""``pslm bench overlap``: how much communication overlap hides when the network is the
bottleneck, not the CPU.

On this machine's loopback, moving a step's bytes is CPU work on the same two cores that
compute (ZeroMQ's I/O threads, the kernel's copies, the server), so there is nothing to hide
communication behind. A real link is slower than the CPU and costs it little. This benchmark
makes one: a network namespace of its own whose loopback is limited to ``RATE`` by a token
bucket (``tc tbf``; this kernel has no ``netem``, so no added delay), and runs ``pslm bench
train``'s pslm contender there (2 workers + 1 server, BSP, GPT 4x4x128; over the shaped
socket, ``cluster.shm`` off), with and without ``cluster.overlap``, in turn, ``rounds`` times.
Reported: tokens/s and the median exposed communication per step (``comm_s``); the part of
the plain run's communication that overlap hides is 1 - overlap / plain.

Needs root and iproute2 (``ip``, ``tc``); the namespace is removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError

RATE = os.environ.get("PSLM_BENCH_RATE", "2gbit")
CHILD = """
import json, sys
from pathlib import Path
from pslm.bench import train as bt
data = bt._synthetic_data(Path(sys.argv[1]) / "data")
run = Path(sys.argv[1]) / "run"
tps, comm = bt._pslm(data, int(sys.argv[3]), run, overlap=sys.argv[2] == "1", shm=False)
print(json.dumps({"tokens_per_s": tps, "comm_s": comm}))
"""


def run(*, quick: bool = False) -> dict[str, Any]:
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        raise ConfigError(
            "pslm bench overlap shapes a link in a network namespace: it needs "
            "root and iproute2 (ip, tc)"
        )
    steps = 30 if quick else 150
    rounds = 1 if quick else 3
    ns = f"pslm-bench-{os.getpid()}"
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _sh(
            "ip",
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            RATE,
            "burst",
            "256kb",
            "latency",
            "50ms",
        )
        got: dict[str, list[tuple[float, float]]] = {"plain": [], "overlap": []}
        for _ in range(rounds):
            for name in got:
                got[name].append(_in_namespace(ns, name == "overlap", steps))
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    tps = {k: statistics.median(t for t, _ in v) for k, v in got.items()}
    comm = {k: statistics.median(c for _, c in v) for k, v in got.items()}
    return {
        "bench": "overlap",
        "link": f"loopback limited to {RATE} (tc tbf)",
        "plain_tokens_per_s": round(tps["plain"]),
        "overlap_tokens_per_s": round(tps["overlap"]),
        "overlap_vs_plain": round(tps["overlap"] / tps["plain"], 3),
        "plain_comm_ms": round(comm["plain"] * 1e3, 2),
        "overlap_comm_ms": round(comm["overlap"] * 1e3, 2),
        "overlap_hides": round(1 - comm["overlap"] / comm["plain"], 3),
        "rounds": {k: [[round(t), round(c * 1e3, 2)] for t, c in v] for k, v in got.items()},
        "steps": steps,
    }


def _in_namespace(ns: str, overlap: bool, steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="pslm-bench-overlap-") as tmp:
        res = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-c",
                CHILD,
                tmp,
                "1" if overlap else "0",
                str(steps),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(Path(__file__).parents[2]),
            },
        )
    if res.returncode:
        raise RuntimeError(f"the run in the namespace failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return float(out["tokens_per_s"]), float(out["comm_s"])


def _sh(*args: str) -> None:
    res = subprocess.run(list(args), capture_output=True, text=True)
    if res.returncode:
        raise ConfigError(f"{' '.join(args)} failed: {res.stderr.strip()}")
