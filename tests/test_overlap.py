"""Overlap and sparse embedding rows in `pslm train`: they change when and how many bytes
travel, never what is computed."""

from __future__ import annotations

import json
import math
import random
import tomllib
from pathlib import Path

import pytest
from safetensors import safe_open

from pslm.lm.data import GlobalBatches, PreparedData, get_batch, worker_slice
from tests.test_train import CONFIG, _story, metrics, pslm


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("overlap")
    (root / "story.txt").write_text(_story())
    (root / "tiny.toml").write_text(CONFIG)
    rng = random.Random(1)
    chars = [chr(0x4E00 + i) for i in range(1500)]  # a vocabulary of ~1500 characters
    weights = [1 / (i + 1) for i in range(1500)]  # Zipf: something to learn
    lines = ["".join(rng.choices(chars, weights, k=30)) + "。" for _ in range(4000)]
    (root / "zh.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "corpus": root / "story.txt", "config": root / "tiny.toml"}


def _train(setup: dict[str, Path], name: str, *extra: str | Path) -> Path:
    run = setup["root"] / name
    res = pslm("train", "--config", setup["config"], "--run-dir", run, *extra)
    assert res.returncode == 0, res.stdout + res.stderr
    return run


SAME = ("step", "loss", "val_loss", "version", "bytes_pushed", "bytes_pulled", "lr")


@pytest.mark.parametrize("codec", ["none", pytest.param("bf16", marks=pytest.mark.slow)])
def test_overlap_changes_nothing_but_when_bytes_travel(setup, codec: str) -> None:
    flags = ["--data", setup["corpus"], "--push-codec", codec, "--pull-codec", codec]
    runs = {o: _train(setup, f"{codec}-{o}", *flags, *(["--overlap"] if o else [])) for o in (0, 1)}
    plain, overlapped = (metrics(runs[o]) for o in (0, 1))
    assert len(plain) == len(overlapped) == 30
    for a, b in zip(plain, overlapped, strict=True):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
        assert set(a) == set(b)  # the same fields, exposed communication among them
        assert b["comm_s"] > 0 and b["compute_s"] > 0
    configs = [tomllib.loads((runs[o] / "config.toml").read_text()) for o in (0, 1)]
    assert configs[1]["cluster"].pop("overlap") and not configs[0]["cluster"].pop("overlap")
    configs[0].pop("run_dir"), configs[1].pop("run_dir")
    assert configs[0] == configs[1]
    ckpts = [sorted(p.name for p in (runs[o] / "checkpoints").iterdir()) for o in (0, 1)]
    assert ckpts[0] == ckpts[1] == ["step_0000020", "step_0000030"]
    tensors = []
    for o in (0, 1):
        path = runs[o] / "checkpoints" / "step_0000030" / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            tensors.append({k: f.get_tensor(k) for k in f.keys()})
    assert all(tensors[0][k].equal(tensors[1][k]) for k in tensors[0])


def test_sparse_rows_send_only_the_batch_rows(setup) -> None:
    """Untied embeddings: each step worker 0 pushes its batch's rows (int32 row numbers and
    fp32 values) and the next batch's row numbers, and pulls those rows' values back; the rest
    of the model travels whole."""
    run = _train(setup, "rows", "--data", setup["root"] / "zh.txt", "--untie-embeddings")
    recs = metrics(run)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5  # it learns
    with safe_open(str(run / "checkpoints" / "step_0000030" / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    vocab, width = shapes["transformer.wte.weight"]
    assert shapes["lm_head.weight"] == [vocab, width] and vocab > 1000  # untied
    dense = 4 * sum(math.prod(s) for k, s in shapes.items() if k != "transformer.wte.weight")
    path = Path(json.loads((run / "data.json").read_text())["prepared"])
    prepared = PreparedData(path, json.loads((path / "meta.json").read_text()))
    tokens = prepared.tokens("train")
    cfg = tomllib.loads((run / "config.toml").read_text())
    block, batch, seed = (
        cfg["model"]["block_size"],
        cfg["train"]["batch_size"],
        cfg["train"]["seed"],
    )
    batches = GlobalBatches(len(tokens), block_size=block, batch_size=batch, seed=seed)
    lo, hi = worker_slice(0, 2, batch)

    def unique(step: int) -> int:
        if step == len(recs):
            return 0
        return len(get_batch(tokens, batches.offsets(step)[lo:hi], block)[0].unique())

    for r in recs:
        used, upcoming = unique(r["step"]), unique(r["step"] + 1)
        assert r["bytes_pushed"] == dense + used * (4 * width + 4) + 4 * upcoming
        assert r["bytes_pulled"] == dense + upcoming * 4 * width
        # vocab / unique tokens, minus the row numbers' overhead (4 bytes a row, each way)
        saved = (vocab * width * 4) / (r["bytes_pushed"] - dense)
        assert saved >= vocab / max(used, upcoming) * (4 * width) / (4 * width + 8)
        assert saved > 10
