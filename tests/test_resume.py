"""`pslm train --resume`: a run killed with -9 continues from its newest complete checkpoint
and ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pslm.train.logfile import read_records
from tests.conftest import REPO, alive
from tests.test_train import CONFIG, _pids, _story, _wait_for, metrics, pslm

STEPS = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    (root / "story.txt").write_text(_story())
    (root / "tiny.toml").write_text(CONFIG.replace("steps = 30", f"steps = {STEPS}"))
    return {"root": root, "corpus": root / "story.txt", "config": root / "tiny.toml"}


def _args(setup: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(setup["config"]),
        "--data",
        str(setup["corpus"]),
        "--run-dir",
        str(run),
        *extra,
    ]


# asynchronous runs repeat exactly only with one worker (with two, the order of their pushes
# depends on timing)
@pytest.mark.slow  # (BSP resumes are in the default suite too: test_train and test_steering)
@pytest.mark.parametrize("consistency, workers", [("bsp", 2), ("ssp:1", 1)])
def test_a_run_killed_and_resumed_ends_where_an_uninterrupted_one_does(
    setup, consistency: str, workers: int
) -> None:
    shape = ["--consistency", consistency, "--workers", str(workers)]
    whole = setup["root"] / f"whole-{consistency}"
    res = pslm(*_args(setup, whole, *shape))
    assert res.returncode == 0, res.stderr
    run = setup["root"] / f"cut-{consistency}"
    # the same run, one worker slowed down so that it can be killed midway (slowness changes
    # no result); kill -9 the whole job once a checkpoint is complete
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *_args(setup, run, *shape, "--slow-worker", "0:40")],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        pids = _wait_for(lambda: _pids(run, nodes=4 + workers), "the cluster")
        _wait_for(lambda: (run / "checkpoints" / "step_0000020").exists(), "a checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_for(lambda: not any(alive(p) for p in pids), "every process to end", within=20)
    done = [r["step"] for r in metrics(run)]
    assert done and done[-1] < STEPS - 1  # it was cut short
    # the kill may come after a checkpoint and before its step's line in metrics.jsonl: make
    # that so (the checkpoint carries the line); and a kill mid-line can leave a torn last
    # line that happens to end in "}"
    newest = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    kept = [r for r in read_records(run / "metrics.jsonl").records if r["step"] < newest - 1]
    torn = '{"step": %d, "loss": 2.5, "staleness_hist": {"0": 3}' % (newest - 1)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + torn)
    # a checkpoint being written when the kill came leaves a temporary directory behind
    partial = run / "checkpoints" / ".tmp-step_0000090"
    partial.mkdir()
    (partial / "shard-000-of-002.safetensors").write_bytes(b"\0" * 100)
    # and the newest checkpoint's first shard cut short (a disk that filled up): the resume
    # falls back to the checkpoint before it, saying so, and still ends where the whole run did
    shard = sorted((run / "checkpoints" / f"step_{newest:07d}").glob("shard-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    res = pslm("train", "--resume", run)
    assert res.returncode == 0, res.stdout + res.stderr
    said = " ".join(res.stdout.split())  # (the console wraps long lines)
    assert f"skipped checkpoint step_{newest:07d}: {shard.name} has" in said
    assert not partial.exists()
    cut, uncut = metrics(run), metrics(whole)
    assert [r["step"] for r in cut] == list(range(STEPS))  # every step once
    for a, b in zip(cut, uncut, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert ("val_loss" in a) == ("val_loss" in b)
        assert a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0), rel=1e-5)
    final = [
        load_file(str(r / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
        for r in (run, whole)
    ]
    for name, t in final[1].items():
        torch.testing.assert_close(final[0][name], t, rtol=1e-5, atol=1e-7)
    shard = [
        load_file(str(r / "checkpoints" / f"step_{STEPS:07d}" / "shard-001-of-002.safetensors"))
        for r in (run, whole)
    ]
    for name, t in shard[1].items():  # optimizer state and step counters too
        torch.testing.assert_close(shard[0][name], t, rtol=1e-5, atol=1e-7)


def test_resume_refuses_what_it_cannot_continue(setup, tmp_path) -> None:
    run = tmp_path / "short"
    res = pslm(*_args(setup, run, "--steps", "10", "--workers", "1", "--servers", "1"))
    assert res.returncode == 0, res.stderr
    cases = [
        (["train", "--resume", run], "is complete"),
        (["train", "--resume", tmp_path / "nothing"], "no run to resume"),
        (["train", "--resume", run, "--steps", "20"], "drop --steps"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_bytes((run / "config.toml").read_bytes())
    cases.append((["train", "--resume", tmp_path / "empty"], "no complete checkpoint"))
    for args, fragment in cases:
        res = pslm(*args)
        assert res.returncode == 1 and fragment in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
    meta = json.loads((run / "checkpoints" / "step_0000010" / "meta.json").read_text())
    assert meta["step"] == 10 and meta["version"] == 10 and "round" in meta
