"""Small files the run directory shares between processes are never seen half written."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pslm.files import write_atomic
from pslm.lm.checkpoint import latest_checkpoint, read_run_model, step_dir
from pslm.lm.model import GPT, GPTConfig
from pslm.train.checkpointer import Checkpointer
from pslm.train.config import TrainSection

WRITER = """
import sys
from pslm.lm.checkpoint import write_run_model
from pslm.lm.model import GPTConfig
for i in range(int(sys.argv[2])):
    shape = GPTConfig(vocab_size=65, n_layer=1 + i % 3)
    write_run_model(sys.argv[1], shape, {"task": "x" * (i % 4000)})
"""


def test_workers_writing_model_json_at_once_never_show_half_a_file(tmp_path: Path) -> None:
    """Every worker of a run writes the same model.json as it starts; a reader (pslm serve,
    a resumed worker) must read a whole one at any moment."""
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "400"]) for _ in range(2)
    ]
    reads = 0
    deadline = time.monotonic() + 60
    try:
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            if (tmp_path / "model.json").exists():
                doc = read_run_model(tmp_path)  # ConfigError on a half-written file
                assert doc["model"]["n_layer"] in (1, 2, 3)
                reads += 1
    finally:
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)
    assert reads > 0
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary file left


def test_write_atomic_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cluster.json"
    write_atomic(path, json.dumps({"a": 1}))
    write_atomic(path, json.dumps({"a": 2}))
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["cluster.json"]


def test_a_diverged_model_publishes_no_checkpoint_over_the_healthy_ones(tmp_path: Path) -> None:
    """The leader's checkpoint of non-finite parameters is skipped (and said so in the step's
    record) before anything is written, so the kept checkpoints stay the healthy ones."""
    healthy = step_dir(tmp_path, 10)
    healthy.mkdir(parents=True)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    # only the leader's own check runs: no server, share or mirror is touched
    leader = SimpleNamespace(leader=True)
    checkpointer = Checkpointer(
        None,  # type: ignore[arg-type]
        leader,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        run_dir=tmp_path,
        train=TrainSection(keep_checkpoints=1),
        live=None,  # type: ignore[arg-type]
        task=SimpleNamespace(model=model),  # type: ignore[arg-type]
    )
    record: dict[str, object] = {"step": 20, "loss": float("nan"), "time": 1.0}
    checkpointer.save(20, 21, record, asynchronous=False, round=0)
    assert record["checkpoint"] == "skipped: the parameters are not finite"
    assert latest_checkpoint(tmp_path) == healthy
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000010"]
