"""``pslm bench consistency``: BSP, SSP, ASP and local SGD, with and without compression, under
stragglers, on the same model and data.

Character-level tiny Shakespeare, GPT 4x4x128, block 64, global batch 12, 2 workers + 2
servers, AdamW as in ``configs/shakespeare-char.toml`` but ``steps`` steps. For each straggler
scenario (none; transient ``0.1:5``; persistent ``1:2``), each consistency model (BSP also
with overlap) and each codec (none; bf16 both ways; top-k 1% on pushes) one run reports:
tokens/s, bytes per step (worker 0's pushes + pulls), exposed communication per step (worker
0's median ``comm_s``),
validation loss after ``steps`` steps (every run has then seen the same samples), validation
loss at a fixed training time (half of that scenario's BSP run), and the time to reach BSP's
final validation loss as a fraction of BSP's time. So that they can get there, the runs that
are not BSP go on for EXTEND x ``steps`` steps, their learning rate at its final value after
``steps`` (the schedule of the first ``steps`` steps is BSP's). Every run exchanges over the
socket (``cluster.shm`` off), as between machines. Times leave out evaluating
(under SSP/ASP worker 0 evaluates alone). Plots of validation loss against training time go to
``PSLM_BENCH_PLOTS`` (default ``bench-results/``).

Beside each measured time, the least it could be (``time_bound_vs_bsp``): the straggler
draws of the run replayed on a model with free communication and a step of one time unit
(``clock_bound``). It assumes a model needs as many samples as BSP to get to BSP's loss, so a
run that needs more cannot come under it.

Environment: ``PSLM_SHAKESPEARE`` (the text; default ../shared/data/tinyshakespeare.txt),
``PSLM_BENCH_STEPS`` (default 400).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError
from pslm.lm.corpus import load_corpus
from pslm.lm.data import PreparedData, prepare
from pslm.ps.launch.local import LaunchConfig, LocalCluster
from pslm.train.config import TrainConfig, TrainSection

MODES = ("bsp", "bsp+overlap", "ssp:1", "ssp:3", "asp", "local:4")
EXTEND = 2
"""How much longer than BSP the other models may train to reach BSP's final loss."""
WORKERS = 2
"""Workers of every run here (and of ``straggler_bounds`` unless told otherwise)."""
CODECS = {"none": ("none", "none"), "bf16": ("bf16", "bf16"), "topk1%": ("topk:0.01", "none")}
SEED = 1337
"""Every run's seed: its initial values, batches and straggler draws."""
SCENARIOS = {"none": ("", ""), "transient": ("", "0.1:5"), "persistent": ("1:2", "")}


def run(*, quick: bool = False) -> dict[str, Any]:
    text = Path(os.environ.get("PSLM_SHAKESPEARE", "../shared/data/tinyshakespeare.txt"))
    if not text.exists():
        raise ConfigError(f"no tiny Shakespeare at {text}; set PSLM_SHAKESPEARE")
    steps = 40 if quick else int(os.environ.get("PSLM_BENCH_STEPS", "400"))
    data = prepare(load_corpus(str(text)), tokenizer="char", val_fraction=0.1)
    modes = ("bsp", "bsp+overlap", "asp") if quick else MODES
    codecs = {"none": CODECS["none"]} if quick else CODECS
    scenarios = {"transient": SCENARIOS["transient"]} if quick else SCENARIOS
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for scenario, (slow, straggle) in scenarios.items():
        runs = {}
        for mode in modes:
            for codec, (push, pull) in codecs.items():
                total = steps if mode.startswith("bsp") else EXTEND * steps
                recs = _run(data, steps, total, mode, push, pull, slow, straggle)
                runs[(mode, codec)] = recs
                if codec == "none":
                    curves.setdefault(scenario, {})[mode] = _curve(recs)
        bounds = straggler_bounds(steps, slow, straggle)
        rows.extend(
            {**r, "time_bound_vs_bsp": bounds[r["mode"]]} for r in _rows(scenario, runs, steps)
        )
    plots = _plot(curves, Path(os.environ.get("PSLM_BENCH_PLOTS", "bench-results")))
    return {"bench": "consistency", "steps": steps, "rows": rows, "plots": plots}


def _run(
    data: PreparedData,
    steps: int,
    total: int,
    mode: str,
    push: str,
    pull: str,
    slow: str,
    straggle: str,
) -> list[dict[str, Any]]:
    consistency, _, overlap = mode.partition("+")
    cfg = TrainConfig.from_dict(
        {
            "model": {
                "preset": "small",
                "n_layer": 4,
                "n_head": 4,
                "n_embd": 128,
                "block_size": 64,
                "bias": False,
            },
            "data": {"tokenizer": "char"},
            "optim": {
                "lr": 1e-3,
                "min_lr": 1e-4,
                "warmup_steps": min(100, steps // 10),
                "decay_steps": steps,
                "betas": [0.9, 0.99],
                "weight_decay": 0.1,
                "clip_norm": 1.0,
            },
            "train": {
                "steps": total,
                "batch_size": 12,
                "eval_interval": max(1, steps // 16),
                "eval_iters": 20,
                "checkpoint_interval": total,
                "sample_tokens": 0,
                "slow_worker": slow,
                "straggle": straggle,
                "seed": SEED,
            },
            "cluster": {
                "workers": WORKERS,
                "servers": 2,
                "consistency": consistency,
                "push_codec": push,
                "pull_codec": pull,
                "overlap": overlap == "overlap",
                "shm": False,  # every byte over the socket, so that codecs are compared fairly
            },
        }
    ).resolved()
    with tempfile.TemporaryDirectory(prefix="pslm-consistency-") as tmp:
        launch = LaunchConfig(
            num_servers=2,
            num_workers=WORKERS,
            worker="pslm.train.worker:run",
            run_dir=tmp,
            worker_args={"config": cfg.to_dict(), "run_dir": tmp, "data_path": str(data.path)},
        )
        with LocalCluster(launch) as cluster:
            cluster.wait(timeout=3600)
        return [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]


def clock_bound(
    slowdown: Callable[[int, int], float], steps: int, workers: int, bound: int | None
) -> float:
    """Time until ``workers`` have trained ``steps`` global batches (``steps`` x ``workers``
    shares, whoever trains them) when worker r's step t takes ``1 + slowdown(r, t)`` units,
    communication is free, and a worker starts its step t only once every other one has
    finished its step t - bound - 1 (``bound`` 0: BSP; None: ASP, which never waits)."""
    horizon = steps * workers  # no worker can train more shares than all of them
    done = [[0.0] * horizon for _ in range(workers)]
    for t in range(horizon):
        for r in range(workers):
            start = done[r][t - 1] if t else 0.0
            if bound is not None and t > bound:
                start = max(start, *(done[o][t - bound - 1] for o in range(workers) if o != r))
            done[r][t] = start + 1.0 + slowdown(r, t)
    return sorted(x for row in done for x in row)[horizon - 1]


def straggler_bounds(
    steps: int, slow: str, straggle: str, workers: int = WORKERS
) -> dict[str, float | None]:
    """Per mode, ``clock_bound`` for the run's straggler draws as a fraction of BSP's (None
    for local SGD, whose steps are not all exchanges)."""
    train = TrainSection(steps=steps, seed=SEED, slow_worker=slow, straggle=straggle)

    def draw(rank: int, step: int) -> float:
        return train.slowdown(rank, step, workers)

    bsp = clock_bound(draw, steps, workers, 0)
    kinds = {"ssp:1": 1, "ssp:3": 3, "asp": None}
    out: dict[str, float | None] = {"bsp": 1.0, "bsp+overlap": 1.0, "local:4": None}
    out.update({m: round(clock_bound(draw, steps, workers, b) / bsp, 3) for m, b in kinds.items()})
    return out


def _curve(recs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(training time, validation loss) of worker 0's evaluations, the time spent evaluating
    left out (under SSP/ASP worker 0 evaluates alone); the last at the run's end."""
    points = [(r["train_time"], r["val_loss"]) for r in recs if "val_loss" in r]
    points[-1] = (_end(recs), points[-1][1])
    return points


def _end(recs: list[dict[str, Any]]) -> float:
    """When the whole run was done (all workers), in training time."""
    last = recs[-1]
    return float(last["end_train_time"]) if "end_train_time" in last else float(last["time"])


def _rows(
    scenario: str, runs: dict[tuple[str, str], list[dict[str, Any]]], steps: int
) -> list[dict[str, Any]]:
    base = runs[("bsp", "none")]
    base_time = _end(base)
    target = base[-1]["val_loss"]
    rows = []
    for (mode, codec), recs in runs.items():
        curve = _curve(recs)
        tokens = len(recs) * 12 * 64
        at_steps = next(r for r in recs if r["step"] == steps - 1)
        at_half = [v for t, v in curve if t <= base_time / 2]
        reached = next((t for t, v in curve if v <= target), None)
        rows.append(
            {
                "scenario": scenario,
                "mode": mode,
                "codec": codec,
                "tokens_per_s": round(tokens / _end(recs)),
                "bytes_per_step": round(
                    statistics.mean(r["bytes_pushed"] + r["bytes_pulled"] for r in recs)
                ),
                "comm_ms": round(statistics.median(r["comm_s"] for r in recs) * 1e3, 2),
                "val_loss_at_steps": at_steps["val_loss"],
                "steps_run": len(recs),
                "val_loss_at_half_bsp_time": at_half[-1] if at_half else None,
                "time_to_bsp_loss_vs_bsp": round(reached / base_time, 3) if reached else None,
                "staleness_max": recs[-1]["staleness_max"],
            }
        )
    return rows


def _plot(curves: dict[str, dict[str, list[tuple[float, float]]]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for scenario, by_mode in curves.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, points in by_mode.items():
            ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=mode)
        ax.set_xlabel("training time (s), evaluations left out")
        ax.set_ylabel("validation loss")
        ax.set_title(f"tiny Shakespeare, {WORKERS} workers, stragglers: {scenario}")
        ax.legend()
        fig.tight_layout()
        path = out / f"consistency-{scenario}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths
