"""``pslm bench train``: training throughput of pslm vs plain PyTorch and DDP, same model.

The model of DESIGN.md's measurements: GPT 4 layers, 4 heads, 128 wide, block 64, a 65-token
vocabulary, 12 sequences per worker per step, AdamW; random tokens (throughput does not
depend on the text). Three contenders, each one thread per process:

- single: one plain PyTorch process, batch 12 (``torch.optim.AdamW(fused=True)``);
- ddp: ``DistributedDataParallel`` over gloo, 2 processes, 12 sequences each;
- pslm: ``pslm train``'s own worker loop, 2 workers + 1 server, BSP, 12 sequences each; workers
  and server share this machine, so dense values go through shared memory (the default);
- pslm socket: the same with ``cluster.shm`` off: every byte over ZeroMQ/TCP, as between
  machines;
- pslm overlap: the socket run with ``cluster.overlap`` (pushes during backward, per-module
  waits in the next forward).

tokens/s counts the tokens of the steps after a warm-up; the ideal for 2 workers is twice the
single process. For pslm also the median exposed communication per step (``comm_s``), and how
much of the socket run's overlap hides. The five run in turn, ``rounds`` times; medians.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pslm.lm.checkpoint import write_run_model
from pslm.lm.data import GlobalBatches, PreparedData, get_batch, worker_slice
from pslm.lm.model import GPT, GPTConfig
from pslm.lm.tokenizer import CharTokenizer
from pslm.ps.launch.local import LaunchConfig, LocalCluster
from pslm.train.config import TrainConfig

VOCAB, BLOCK, PER_WORKER = 65, 64, 12
MODEL = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=4, n_head=4, n_embd=128, bias=False)
WARMUP = 10


def run(*, quick: bool = False) -> dict[str, Any]:
    steps = 30 if quick else 200
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="pslm-bench-train-") as tmp:
        data = _synthetic_data(Path(tmp) / "data")
        names = ("single", "ddp", "pslm", "socket", "overlap")
        got: dict[str, list[float]] = {k: [] for k in names}
        comm: dict[str, list[float]] = {k: [] for k in names[2:]}
        for r in range(rounds):
            got["single"].append(_single(data, steps))
            got["ddp"].append(_ddp(data, steps))
            for name in names[2:]:
                tps, c = _pslm(
                    data,
                    steps,
                    Path(tmp) / f"{name}{r}",
                    overlap=name == "overlap",
                    shm=name == "pslm",
                )
                got[name].append(tps)
                comm[name].append(c)
    single, ddp, ps, sock, ov = (statistics.median(got[k]) for k in names)
    comm_shm, comm_sock, comm_overlap = (statistics.median(comm[k]) for k in names[2:])
    return {
        "bench": "train",
        "single_tokens_per_s": round(single),
        "ddp_tokens_per_s": round(ddp),
        "pslm_tokens_per_s": round(ps),
        "pslm_socket_tokens_per_s": round(sock),
        "pslm_overlap_tokens_per_s": round(ov),
        "pslm_vs_ddp": round(ps / ddp, 3),
        "pslm_socket_vs_ddp": round(sock / ddp, 3),
        "pslm_overlap_vs_ddp": round(ov / ddp, 3),
        "pslm_vs_ideal": round(ps / (2 * single), 3),
        "pslm_socket_vs_ideal": round(sock / (2 * single), 3),
        "pslm_overlap_vs_ideal": round(ov / (2 * single), 3),
        "ddp_vs_ideal": round(ddp / (2 * single), 3),
        "pslm_comm_ms": round(comm_shm * 1e3, 2),
        "pslm_socket_comm_ms": round(comm_sock * 1e3, 2),
        "pslm_overlap_comm_ms": round(comm_overlap * 1e3, 2),
        "overlap_hides": round(1 - comm_overlap / comm_sock, 3),
        "rounds": {k: [round(v) for v in vs] for k, vs in got.items()},
        "steps": steps,
    }


def _synthetic_data(path: Path) -> PreparedData:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 1_000_000), ("val", 100_000)):
        rng.integers(0, VOCAB, size=n, dtype=np.uint16).tofile(path / f"{split}.bin")
    CharTokenizer(chr(33 + i) for i in range(VOCAB - 1)).save(path / "tokenizer.json")
    meta = {
        "dtype": "uint16",
        "vocab_size": VOCAB,
        "train_tokens": 1_000_000,
        "val_tokens": 100_000,
        "documents": 1,
        "name": "random",
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return PreparedData(path, meta)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(MODEL)


def _optimizer(model: GPT) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=True)


def _train_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    tokens: np.ndarray,
    batches: GlobalBatches,
    rows: tuple[int, int],
    steps: int,
) -> float:
    """Seconds for ``steps`` steps after WARMUP warm-up steps."""
    start = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        x, y = get_batch(tokens, batches.offsets(step)[rows[0] : rows[1]], BLOCK)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - start


def _single(data: PreparedData, steps: int) -> float:
    code = f"from pslm.bench.train import _single_main; _single_main({str(data.path)!r}, {steps})"
    out = _run_python(code)
    return float(json.loads(out)["tokens_per_s"])


def _single_main(data_path: str, steps: int) -> None:
    torch.set_num_threads(1)
    tokens = np.memmap(Path(data_path) / "train.bin", dtype=np.uint16, mode="r")
    model = _model()
    batches = GlobalBatches(len(tokens), block_size=BLOCK, batch_size=PER_WORKER, seed=1)
    seconds = _train_steps(model, _optimizer(model), tokens, batches, (0, PER_WORKER), steps)
    print(json.dumps({"tokens_per_s": steps * PER_WORKER * BLOCK / seconds}))


def _ddp(data: PreparedData, steps: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from pslm.bench.train import _ddp_main; "
                f"_ddp_main({rank}, {port}, {str(data.path)!r}, {steps})",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for rank in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"DDP benchmark failed: {outs}")
    return float(json.loads(outs[0].strip().splitlines()[-1])["tokens_per_s"])


def _ddp_main(rank: int, port: int, data_path: str, steps: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tokens = np.memmap(Path(data_path) / "train.bin", dtype=np.uint16, mode="r")
    model = DistributedDataParallel(_model())
    batches = GlobalBatches(len(tokens), block_size=BLOCK, batch_size=2 * PER_WORKER, seed=1)
    rows = worker_slice(rank, 2, 2 * PER_WORKER)
    seconds = _train_steps(model, _optimizer(model.module), tokens, batches, rows, steps)
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"tokens_per_s": steps * 2 * PER_WORKER * BLOCK / seconds}))


def _pslm(
    data: PreparedData,
    steps: int,
    run_dir: Path,
    *,
    overlap: bool = False,
    shm: bool = True,
    servers: int = 1,
    replicas: int = 0,
    serve_refresh: float = 0.0,
    warmup: int = WARMUP,
) -> tuple[float, float]:
    """tokens/s over ``steps`` steps after warm-up, and the median exposed communication.
    ``serve_refresh`` > 0: a ``pslm serve`` process follows the cluster meanwhile, reading
    the parameters every ``serve_refresh`` seconds."""
    total = warmup + steps + 1
    cfg = TrainConfig.from_dict(
        {
            "model": {
                "preset": "small",
                "n_layer": 4,
                "n_head": 4,
                "n_embd": 128,
                "block_size": BLOCK,
                "bias": False,
            },
            "optim": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1, "clip_norm": 1.0},
            "train": {
                "steps": total,
                "batch_size": 2 * PER_WORKER,
                "eval_interval": total,
                "eval_iters": 1,
                "checkpoint_interval": total,
                "sample_tokens": 0,
            },
            "cluster": {
                "workers": 2,
                "servers": servers,
                "overlap": overlap,
                "shm": shm,
                "replicas": replicas,
            },
        }
    )
    run_dir.mkdir(parents=True)
    launch = LaunchConfig(
        num_servers=servers,
        replicas=replicas,
        num_workers=2,
        worker="pslm.train.worker:run",
        run_dir=str(run_dir),
        worker_args={"config": cfg.to_dict(), "run_dir": str(run_dir), "data_path": str(data.path)},
    )
    with LocalCluster(launch) as cluster:
        follower = _follow(run_dir, data, serve_refresh) if serve_refresh > 0 else None
        try:
            cluster.wait(timeout=900)
        finally:
            if follower is not None:
                follower.send_signal(signal.SIGINT)
                follower.wait(timeout=30)
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the last step also evaluates and checkpoints: time the steps before it
    first, last = recs[warmup - 1], recs[warmup - 1 + steps]
    comm = statistics.median(r["comm_s"] for r in recs[warmup : warmup + steps])
    return steps * 2 * PER_WORKER * BLOCK / (last["time"] - first["time"]), comm


def _follow(run_dir: Path, data: PreparedData, refresh: float) -> subprocess.Popen[bytes]:
    """A serving process that follows the cluster in ``run_dir`` (read-only)."""
    write_run_model(run_dir, MODEL, {})
    shutil.copyfile(data.path / "tokenizer.json", run_dir / "tokenizer.json")
    return subprocess.Popen(
        [sys.executable, "-m", "pslm", "serve", "--run", str(run_dir), "--follow"]
        + ["--refresh", str(refresh), "--port", "0", "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _run_python(code: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if res.returncode:
        raise RuntimeError(f"benchmark process failed: {res.stderr[-2000:]}")
    return res.stdout.strip().splitlines()[-1]
