"""``pslm demo``: a small MLP trained by worker processes through the parameter server.

A worked example of using the PS from any PyTorch loop: each worker computes gradients on its
slice of a global batch drawn from (seed, step), pushes them, and gets the updated parameters
back in the same exchange. Worker 0 writes ``metrics.jsonl``; the launcher prints progress.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from pslm.errors import ConfigError
from pslm.ps.client.client import PSClient
from pslm.ps.core.optim import OptimizerConfig, ScheduleConfig
from pslm.ps.launch.local import LaunchConfig, LocalCluster
from pslm.train.logfile import parse_record

IN, HIDDEN, OUT = 32, 128, 4


def global_batch(seed: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: inputs and the labels of a fixed random teacher network."""
    teacher = torch.Generator().manual_seed(seed)
    w = torch.randn(IN, OUT, generator=teacher)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(size, IN, generator=g)
    return x, (x @ w).argmax(dim=1)


def train_mlp(client: PSClient, *, steps: int, batch_size: int, seed: int, run_dir: str) -> None:
    """Worker function: train the demo MLP for ``steps`` BSP steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
    params = dict(model.named_parameters())
    data = {n: p.data for n, p in params.items()}
    warmup = min(10, steps // 10)
    schedule = ScheduleConfig(
        kind="cosine", warmup_steps=warmup, decay_steps=steps + 1, min_lr=1e-4
    )
    client.init(
        data,
        OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.01, clip_norm=1.0, schedule=schedule),
    )
    lo = client.rank * batch_size // client.num_workers
    hi = (client.rank + 1) * batch_size // client.num_workers
    metrics = open(Path(run_dir) / "metrics.jsonl", "a") if client.rank == 0 else None
    start = time.perf_counter()
    for step in range(steps):
        x, y = global_batch(seed, step, batch_size)
        loss = nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi])
        model.zero_grad(set_to_none=False)
        loss.backward()
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        client.wait(client.push_pull(grads, data, clock=step, weight=hi - lo))
        if metrics is not None:
            record = {
                "step": step,
                "time": round(time.perf_counter() - start, 4),
                "loss": round(loss.item(), 5),
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
    if metrics is not None:
        metrics.close()


def run_demo(*, workers: int, servers: int, steps: int, run_dir: str) -> int:
    """Start a local cluster, train, print progress; returns the exit code."""
    if steps < 1 or workers < 1 or servers < 1:
        raise ConfigError("--steps, --workers and --servers must be >= 1")
    out = Path(run_dir or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty directory; choose another --run-dir")
    out.mkdir(parents=True, exist_ok=True)
    cfg = LaunchConfig(
        num_servers=servers,
        num_workers=workers,
        worker="pslm.demo:train_mlp",
        worker_args={"steps": steps, "batch_size": 64, "seed": 0, "run_dir": str(out)},
        run_dir=str(out),
    )
    print(f"pslm demo: {servers} servers, {workers} workers, {steps} steps -> {out}")
    shown = 0
    with LocalCluster(cfg) as cluster:
        while not cluster.poll():
            shown = _show(out / "metrics.jsonl", shown, steps)
            time.sleep(0.2)
        cluster.wait()
    shown = _show(out / "metrics.jsonl", shown, steps)
    print(f"done: logs and cluster.json in {out}")
    return 0


def _show(path: Path, shown: int, steps: int) -> int:
    """Print the metrics lines past ``shown`` every 20 steps; return how many exist."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return shown
    lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines: the writer may be mid-line
    for line in lines[shown:]:
        rec = parse_record(line)  # None: not a record (corrupt); skipped
        if rec is not None and (rec["step"] % 20 == 0 or rec["step"] == steps - 1):
            print(f"step {rec['step']:5d}  loss {rec['loss']:.4f}  time {rec['time']:.2f}s")
    return len(lines)
