"""``pslm worker``: the training loop as a role command, for clusters pslm does not launch.

    export PSLM_SECRET_FILE=/shared/secret PSLM_SECURE=1       # every host: encrypted
    pslm scheduler --num-workers 2 --num-servers 2 --bind tcp://10.0.0.1:9000 --run-dir RUN
    pslm server --scheduler 10.0.0.1:9000 --bind tcp://10.0.0.2:* --run-dir RUN   # per server
    pslm worker --scheduler 10.0.0.1:9000 --config job.toml --data corpus.txt --run-dir RUN

Every worker prepares the corpus itself (the token files are deterministic, so every host gets
the same) and writes the run directory's description (config.toml, tokenizer.json,
model.json, atomically: every worker writes the same) before it joins; the run directory must
be one path that every worker and server can write (a shared file system), as for the
launcher's runs. Metrics and checkpoints are written by the worker holding share 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pslm.errors import ConfigError
from pslm.lm.checkpoint import write_run_model
from pslm.lm.corpus import BUILTIN, load_corpus
from pslm.lm.data import prepare
from pslm.ps.client.client import ClientConfig
from pslm.ps.launch.local import run_worker
from pslm.train.config import TrainConfig, dump_toml


def worker(client: ClientConfig, cfg: TrainConfig, run_dir: Path) -> None:
    """Prepare the data, describe the run, then train as one worker of the cluster."""
    if cfg.finetune.task:
        raise ConfigError("pslm worker pre-trains; fine-tuning runs start with pslm finetune")
    corpus = load_corpus(cfg.data.name)
    data = prepare(
        corpus,
        tokenizer=cfg.data.tokenizer,
        vocab_size=cfg.data.vocab_size,
        val_fraction=cfg.data.val_fraction,
        cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else None,
    )
    source = cfg.data.name if cfg.data.name in BUILTIN else str(Path(cfg.data.name).resolve())
    cfg = cfg.override(data={"name": source}).resolved()
    run_dir.mkdir(parents=True, exist_ok=True)
    _write(run_dir / "config.toml", dump_toml(cfg.to_dict()))
    _write(run_dir / "tokenizer.json", (data.path / "tokenizer.json").read_text())
    write_run_model(run_dir, cfg.model.gpt(data.vocab_size), {})
    args = {"config": cfg.to_dict(), "run_dir": str(run_dir), "data_path": str(data.path)}
    run_worker("pslm.train.worker:run", client, json.loads(json.dumps(args)))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    shutil.move(tmp, path)
