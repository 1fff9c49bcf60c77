"""Small files the run directory shares between processes are never seen half written."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pslm.files import write_atomic
from pslm.lm.checkpoint import read_run_model

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
