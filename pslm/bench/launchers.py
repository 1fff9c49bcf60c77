"""``pslm bench launchers``: tokens/s of the same run under the local launcher and under Ray.

``pslm train`` of ``pslm bench train``'s model (GPT 4x4x128, block 64, 24 sequences per step,
2 workers, 1 server, BSP; random tokens), ``steps`` steps, with ``--launcher local`` and with
``--launcher ray`` (a private Ray instance on this machine, started and stopped by the run), in
turn, ``rounds`` times. tokens/s over the steps after the first 20 (from metrics.jsonl), and
the wall time of the whole command (Ray's start and stop included); medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = """
[model]
preset = "small"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
bias = false
[data]
tokenizer = "char"
[train]
steps = {steps}
batch_size = 24
eval_interval = 100000
checkpoint_interval = 100000
sample_tokens = 0
[cluster]
servers = 1
"""
WARMUP = 20


def run(*, quick: bool = False) -> dict[str, Any]:
    steps = 60 if quick else 300
    rounds = 1 if quick else 3
    got: dict[str, list[float]] = {"local": [], "ray": []}
    wall: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="pslm-bench-launchers-") as tmp:
        root = Path(tmp)
        chars = "".join(chr(33 + i) for i in range(64))
        text = "".join(chars[(i * 7919) % 64] for i in range(400_000))
        (root / "random.txt").write_text(text)
        (root / "job.toml").write_text(CONFIG.format(steps=steps))
        for r in range(rounds):
            for launcher in got:
                run_dir = root / f"{launcher}-{r}"
                t0 = time.perf_counter()
                res = subprocess.run(
                    [sys.executable, "-m", "pslm", "train", "--config", str(root / "job.toml")]
                    + ["--data", str(root / "random.txt"), "--run-dir", str(run_dir)]
                    + ["--launcher", launcher, "--address", "local"],
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                wall[launcher].append(time.perf_counter() - t0)
                if res.returncode:
                    raise RuntimeError(f"{launcher} run failed: {res.stderr[-2000:]}")
                recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                first, last = recs[WARMUP - 1], recs[-2]  # the last step also checkpoints
                tokens = (last["step"] - first["step"]) * 24 * 64
                got[launcher].append(tokens / (last["time"] - first["time"]))
    local, ray = (statistics.median(got[k]) for k in ("local", "ray"))
    return {
        "bench": "launchers",
        "local_tokens_per_s": round(local),
        "ray_tokens_per_s": round(ray),
        "ray_over_local": round(ray / local, 3),
        "local_wall_s": round(statistics.median(wall["local"]), 1),
        "ray_wall_s": round(statistics.median(wall["ray"]), 1),
        "rounds": {k: [round(v) for v in vs] for k, vs in got.items()},
        "steps": steps,
    }
