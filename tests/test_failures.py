"""Worker failures under BSP: kill -9 a worker mid-run; the others take its share of every
batch, the launcher starts it again, it rejoins, and nothing is lost or trained twice."""

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

from pslm.ps.control.leases import NOBODY, ShareLeases
from tests.conftest import REPO
from tests.test_train import CONFIG, _story, _wait_for, metrics, pslm

STEPS = 60


def test_leases_hand_a_dead_workers_share_over_and_back() -> None:
    leases = ShareLeases(3)
    assert leases.orphan(dead=1, live=[0, 2]) == [(1, 0)] and leases.holders == [0, 0, 2]
    assert leases.orphan(dead=2, live=[0]) == [(2, 0)] and leases.held_by(0) == [0, 1, 2]
    assert leases.rebalance([1, 2]) == [(1, 1), (2, 2)]  # their own shares, once released
    assert leases.moving == {1: 1, 2: 2} and leases.holders == [0, 0, 0]
    version = leases.version
    assert leases.release(1, worker=0, clock=17) == 1
    assert leases.holders == [0, 1, 0] and leases.starts == {1: 17}
    assert leases.version > version
    with pytest.raises(ValueError, match="does not hold"):
        leases.release(2, worker=1, clock=18)
    assert leases.orphan(dead=0, live=[1, 2]) == [(0, 1), (2, 1)]  # 2 was moving to 2: dead
    # worker 2 holds nothing yet: still, it is alive
    assert leases.orphan(dead=1, live=[2]) == [(0, 2), (1, 2), (2, 2)]
    assert leases.orphan(dead=2, live=[]) == [(0, NOBODY), (1, NOBODY), (2, NOBODY)]
    assert leases.rebalance([0, 1]) == [(0, 0), (1, 1), (2, 0)]  # nobody's: all given out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("failures")
    (root / "story.txt").write_text(_story())
    config = CONFIG.replace("steps = 30", f"steps = {STEPS}")
    config += "\n[cluster]\nheartbeat_timeout = 2.0\nheartbeat_interval = 0.5\n"
    (root / "tiny.toml").write_text(config)
    return {"root": root, "corpus": root / "story.txt", "config": root / "tiny.toml"}


def _worker_pid(run: Path, rank: int) -> int:
    try:
        doc = json.loads((run / "cluster.json").read_text())
    except (OSError, ValueError):
        return 0
    for n in doc["nodes"]:
        if n["id"] == f"worker-{rank}" and n["state"] == "alive":
            return int(n["pid"])
    return 0


@pytest.mark.parametrize(
    "victim",
    [pytest.param(1, marks=pytest.mark.slow), 0],  # (the leader's case is the harder one)
    ids=["worker-1", "worker-0-the-leader"],
)
def test_a_killed_worker_loses_nothing_and_rejoins(setup, victim: int) -> None:
    args = ["train", "--config", setup["config"], "--data", setup["corpus"]]
    whole = setup["root"] / f"whole-{victim}"
    res = pslm(*args, "--run-dir", whole)
    assert res.returncode == 0, res.stderr
    run = setup["root"] / f"killed-{victim}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *map(str, args), "--run-dir", str(run)]
        + ["--slow-worker", f"{1 - victim}:30"],  # slow enough to be killed midway
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = _wait_for(lambda: _worker_pid(run, victim), "the worker")
        _wait_for(
            lambda: len(metrics(run)) >= 15 if (run / "metrics.jsonl").exists() else 0, "steps"
        )
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    recs, want = metrics(run), metrics(whole)
    assert [r["step"] for r in recs] == list(range(STEPS))  # every step logged once
    for a, b in zip(recs, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert len(a["trained_by"]) == 2  # each share of each batch taken exactly once
    helped = [r["step"] for r in recs if r["trained_by"] != [0, 1]]
    assert helped, "the other worker never trained the dead one's share"
    assert recs[-1]["trained_by"] == [0, 1]  # the restarted worker got its share back
    changes = [r["leases"] for r in recs if "leases" in r]
    assert changes[0] == [1 - victim] * 2 and changes[-1] == [0, 1]  # recorded as they came
    final = [
        load_file(str(r / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
        for r in (run, whole)
    ]
    for name, t in final[1].items():
        torch.testing.assert_close(final[0][name], t, rtol=1e-5, atol=1e-7)
    log = (run / "logs" / "scheduler.log").read_text()
    assert f"worker-{victim} is dead" in log and f"worker-{victim} joined late" in log
    cluster = json.loads((run / "cluster.json").read_text())
    assert cluster["leases"]["holders"] == [0, 1]


def _shard_server(run: Path, shard: int) -> int:
    """The pid of the server of ``shard`` once every shard has its backup; else 0."""
    try:
        doc = json.loads((run / "cluster.json").read_text())
    except (OSError, ValueError):
        return 0
    if not doc.get("shards") or not all(
        s["primary"] and s["backup"] and s["synced"] for s in doc["shards"]
    ):
        return 0
    primary = doc["shards"][shard]["primary"]
    return next(
        (int(n["pid"]) for n in doc["nodes"] if n["id"] == primary and n["state"] == "alive"), 0
    )


def test_a_killed_server_loses_nothing_its_backup_takes_over(setup) -> None:
    """kill -9 the server of shard 0: its backup serves the shard from the version the
    workers last saw, the workers send it what the dead one left unanswered, the restarted
    process becomes the new backup, and the run ends as an undisturbed one, bit for bit."""
    args = ["train", "--config", setup["config"], "--data", setup["corpus"]]
    whole = setup["root"] / "whole-server"
    res = pslm(*args, "--run-dir", whole)
    assert res.returncode == 0, res.stderr
    run = setup["root"] / "killed-server"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *map(str, args), "--run-dir", str(run)]
        + ["--slow-worker", "1:30"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = _wait_for(lambda: _shard_server(run, 0), "the servers and their backups")
        _wait_for(
            lambda: len(metrics(run)) >= 15 if (run / "metrics.jsonl").exists() else 0, "steps"
        )
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    recs, want = metrics(run), metrics(whole)
    assert [r["step"] for r in recs] == list(range(STEPS))
    for a, b in zip(recs, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    final = [
        load_file(str(r / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
        for r in (run, whole)
    ]
    for name, t in final[1].items():
        torch.testing.assert_close(final[0][name], t, rtol=1e-5, atol=1e-7)
    shards = [
        load_file(str(r / "checkpoints" / f"step_{STEPS:07d}" / "shard-000-of-002.safetensors"))
        for r in (run, whole)
    ]
    for name, t in shards[1].items():  # the optimizer state went over too
        torch.testing.assert_close(shards[0][name], t, rtol=1e-5, atol=1e-7)
    sched = (run / "logs" / "scheduler.log").read_text()
    assert "server-0 is dead" in sched and "shard 0: its backup server-2 serves it now" in sched
    assert "server-0 joined as the backup of shard 0" in sched
    back = (run / "logs" / "server-0.log").read_text()
    assert "took shard 0 at version" in back.split("backup of shard 0")[-1]  # rebuilt
    workers = "".join((run / "logs" / f"worker-{r}.log").read_text() for r in (0, 1))
    assert "shard 0 is served by" in workers
    assert [r["failover"] for r in recs if "failover" in r] == [[0]]  # in the metrics too
    cluster = json.loads((run / "cluster.json").read_text())
    assert cluster["shards"][0]["primary"] == "server-2"


def test_a_killed_scheduler_comes_back_and_the_run_goes_on(setup) -> None:
    """kill -9 the scheduler: the launcher starts it again at the same address, it takes the
    cluster over from the state the dead one kept in the run directory, the nodes send it
    what the dead one left unanswered (barriers of evaluations and checkpoints), and the run
    ends as an undisturbed one."""
    args = ["train", "--config", setup["config"], "--data", setup["corpus"]]
    whole = setup["root"] / "whole-scheduler"
    res = pslm(*args, "--run-dir", whole)
    assert res.returncode == 0, res.stderr
    run = setup["root"] / "killed-scheduler"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *map(str, args), "--run-dir", str(run)]
        + ["--slow-worker", "1:30"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _shard_server(run, 0), "the cluster")
        _wait_for(
            lambda: len(metrics(run)) >= 15 if (run / "metrics.jsonl").exists() else 0, "steps"
        )
        first = json.loads((run / "cluster.json").read_text())["scheduler"]["pid"]
        os.kill(first, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    recs, want = metrics(run), metrics(whole)
    assert [r["step"] for r in recs] == list(range(STEPS))
    for a, b in zip(recs, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0), rel=1e-5)
    final = [
        load_file(str(r / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
        for r in (run, whole)
    ]
    for name, t in final[1].items():
        torch.testing.assert_close(final[0][name], t, rtol=1e-5, atol=1e-7)
    log = (run / "logs" / "scheduler.log").read_text()
    assert "recovered the cluster from" in log
    cluster = json.loads((run / "cluster.json").read_text())
    assert cluster["scheduler"]["pid"] != first
    assert all(n["state"] == "exited" for n in cluster["nodes"])  # nobody was lost


@pytest.mark.slow  # (a restart from the checkpoint: also test_under_ssp_...'s path)
def test_without_backups_a_killed_server_sends_the_run_back_to_its_checkpoint(setup) -> None:
    """--replicas 0: kill -9 a server; the cluster starts again from the newest checkpoint
    (the workers go back to its step) and the run still ends as an undisturbed one."""
    args = ["train", "--config", setup["config"], "--data", setup["corpus"], "--replicas", "0"]
    whole = setup["root"] / "whole-server"  # the same run: backups change no result
    if not whole.exists():
        assert pslm(*args, "--run-dir", whole).returncode == 0
    run = setup["root"] / "killed-unbacked-server"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *map(str, args), "--run-dir", str(run)]
        + ["--slow-worker", "1:30"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (run / "checkpoints" / "step_0000020").exists(), "a checkpoint")
        doc = json.loads((run / "cluster.json").read_text())
        pid = next(n["pid"] for n in doc["nodes"] if n["id"] == "server-1")
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    said = " ".join(out.split())  # the console wraps long lines
    assert "died" in said and "starts again from step_" in said
    recs, want = metrics(run), metrics(whole)
    assert [r["step"] for r in recs] == list(range(STEPS))  # the steps done again, once
    for a, b in zip(recs, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    final = [
        load_file(str(r / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
        for r in (run, whole)
    ]
    for name, t in final[1].items():
        torch.testing.assert_close(final[0][name], t, rtol=1e-5, atol=1e-7)


def test_under_ssp_a_killed_worker_sends_the_run_back_to_its_checkpoint(setup) -> None:
    """SSP cannot hand a dead worker's share over: the cluster starts again from the newest
    checkpoint, and the run still trains every step once."""
    args = ["train", "--config", setup["config"], "--data", setup["corpus"]]
    run = setup["root"] / "killed-ssp-worker"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *map(str, args), "--run-dir", str(run)]
        + ["--consistency", "ssp:1", "--slow-worker", "0:30"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (run / "checkpoints" / "step_0000020").exists(), "a checkpoint")
        os.kill(_worker_pid(run, 1), signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    said = " ".join(out.split())
    assert "worker-1 died" in said and "starts again from step_" in said
    assert [r["step"] for r in metrics(run)] == list(range(STEPS))
