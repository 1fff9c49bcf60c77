"""``pslm bench quality``: nanoGPT's CPU baseline on tiny Shakespeare, pslm vs plain PyTorch.

Both train the same model from the same initial values on the same global batches with the
settings of ``configs/shakespeare-char.toml`` (4x4x128, block 64, batch 12, AdamW 1e-3,
betas (0.9, 0.99), weight decay 0.1, clip 1.0, 100 warm-up steps then cosine to 1e-4 at 2000):

- pslm: 2 workers + 2 servers under BSP (6 sequences per worker), ``pslm train``'s own loop;
- plain: one process, ``torch.optim.AdamW`` and ``clip_grad_norm_`` on all 12 sequences.

Validation loss over the same 200 batches, and wall time. Set ``PSLM_SHAKESPEARE`` to the text
file (default ``../shared/data/tinyshakespeare.txt``); ``PSLM_SEEDS`` to e.g. ``1337,1,2``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pslm.errors import ConfigError
from pslm.lm.corpus import load_corpus
from pslm.lm.data import GlobalBatches, PreparedData, get_batch, prepare
from pslm.lm.model import GPT
from pslm.ps.launch.local import LaunchConfig, LocalCluster
from pslm.train.config import TrainConfig, load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shakespeare-char.toml"


def run(*, quick: bool = False) -> dict[str, Any]:
    text = Path(os.environ.get("PSLM_SHAKESPEARE", "../shared/data/tinyshakespeare.txt"))
    if not text.exists():
        raise ConfigError(f"no tiny Shakespeare at {text}; set PSLM_SHAKESPEARE")
    try:
        seeds = [int(s) for s in os.environ.get("PSLM_SEEDS", "1337").split(",")]
    except ValueError:
        raise ConfigError("PSLM_SEEDS must be comma-separated integers, e.g. 1337,1,2") from None
    base = load_config(CONFIG)
    if quick:
        base = base.override(train={"steps": 50, "eval_iters": 10, "eval_interval": 50})
    data = prepare(load_corpus(str(text)), tokenizer="char", val_fraction=0.1)
    rows = []
    for seed in seeds:
        cfg = base.override(train={"seed": seed, "sample_tokens": 0})
        ps_loss, ps_s = _pslm(cfg, data)
        plain_loss, plain_s = _plain(cfg, data)
        rows.append(
            {
                "seed": seed,
                "pslm_val_loss": round(ps_loss, 4),
                "plain_val_loss": round(plain_loss, 4),
                "pslm_seconds": round(ps_s, 1),
                "plain_seconds": round(plain_s, 1),
            }
        )
    return {
        "bench": "quality",
        "rows": rows,
        "pslm_val_loss_mean": round(statistics.mean(r["pslm_val_loss"] for r in rows), 4),
        "plain_val_loss_mean": round(statistics.mean(r["plain_val_loss"] for r in rows), 4),
        "steps": base.train.steps,
        "eval_batches": base.train.eval_iters,
    }


def _pslm(cfg: TrainConfig, data: PreparedData) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="pslm-quality-") as tmp:
        launch = LaunchConfig(
            num_servers=cfg.cluster.servers,
            num_workers=cfg.cluster.workers,
            worker="pslm.train.worker:run",
            run_dir=tmp,
            worker_args={"config": cfg.to_dict(), "run_dir": tmp, "data_path": str(data.path)},
        )
        start = time.perf_counter()
        with LocalCluster(launch) as cluster:
            cluster.wait(timeout=3600)
        seconds = time.perf_counter() - start
        recs = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return float(recs[-1]["val_loss"]), seconds


def _plain(cfg: TrainConfig, data: PreparedData) -> tuple[float, float]:
    torch.set_num_threads(1)
    t = cfg.train
    model_cfg = cfg.model.gpt(data.vocab_size)
    torch.manual_seed(t.seed)
    model = GPT(model_cfg)
    opt_cfg = cfg.optim.optimizer(t.steps)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt_cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=opt_cfg.lr,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
    )
    train, val = data.tokens("train"), data.tokens("val")
    block = model_cfg.block_size
    batches = GlobalBatches(len(train), block_size=block, batch_size=t.batch_size, seed=t.seed)
    start = time.perf_counter()
    for step in range(t.steps):
        x, y = get_batch(train, batches.offsets(step), block)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
        for group in opt.param_groups:
            group["lr"] = opt_cfg.lr_at(step)
        opt.step()
    seconds = time.perf_counter() - start
    val_batches = GlobalBatches(len(val), block_size=block, batch_size=t.batch_size, seed=t.seed)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(t.eval_iters):
            x, y = get_batch(val, val_batches.offsets(i, stream=1), block)
            total += float(model(x, y)[1])
    return total / t.eval_iters, seconds
