"""``pslm eval``: validation loss and perplexity of a run's checkpoint.

    result = evaluate_run("runs/bbc-news-20261125-101500", iters=200)
    # {"val_loss": 3.41, "perplexity": 30.3, "step": 1500, "batches": 200, ...}

The validation split is rebuilt from the run's ``config.toml`` (from the token-file cache when
present) and must be tokenized exactly as in training; the batches are those the training run
evaluated on, so the numbers compare.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from pslm.errors import ConfigError
from pslm.lm.checkpoint import load_model
from pslm.lm.corpus import load_corpus
from pslm.lm.data import GlobalBatches, PreparedData, get_batch, prepare
from pslm.train.config import TrainConfig, load_config


def run_data(run: Path, cfg: TrainConfig, consequence: str) -> PreparedData:
    """The token files a run trained on, rebuilt from its ``data.json`` (or taken from the
    cache); ConfigError, ending with ``consequence``, if its corpus changed since."""
    try:
        record = json.loads((run / "data.json").read_text())
        source, fingerprint = str(record["source"]), str(record["fingerprint"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{run} has no readable data.json ({exc})") from None
    corpus = load_corpus(source)
    if corpus.fingerprint != fingerprint:
        raise ConfigError(f"the corpus at {source} changed since {run} was trained; {consequence}")
    return prepare(
        corpus,
        tokenizer=cfg.data.tokenizer,
        vocab_size=cfg.data.vocab_size,
        val_fraction=cfg.data.val_fraction,
        cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else None,
    )


def evaluate_run(
    run_dir: str, *, iters: int = 200, checkpoint: str | None = None
) -> dict[str, Any]:
    """Mean validation loss over ``iters`` batches of the run's batch size."""
    if iters < 1:
        raise ConfigError(f"iters must be >= 1, got {iters}")
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"no run directory at {run}")
    model, _, meta = load_model(run, checkpoint)
    cfg = load_config(run / "config.toml")
    val = run_data(run, cfg, "its validation split cannot be rebuilt").tokens("val")
    block = model.config.block_size
    batches = GlobalBatches(
        len(val), block_size=block, batch_size=cfg.train.batch_size, seed=cfg.train.seed
    )
    total = 0.0
    with torch.no_grad():
        for i in range(iters):
            x, y = get_batch(val, batches.offsets(i, stream=1), block)
            _, loss = model(x, y)
            assert loss is not None
            total += float(loss.item())
    val_loss = total / iters
    return {
        "run": str(run),
        "step": meta.get("step"),
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss),
        "batches": iters,
        "tokens_per_batch": cfg.train.batch_size * block,
    }
