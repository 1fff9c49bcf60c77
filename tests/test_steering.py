"""pslm ctl: live settings of a running job - set lr, pause, resume, checkpoint - taking effect
at one clock on every worker and server, logged, and kept across a resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from pslm.errors import ConfigError
from pslm.ps.core.optim import OptimizerConfig, ScheduleConfig
from pslm.ps.core.steering import KNOWN, Steering, SteeringLog, parse_assignments
from pslm.ps.server.bsp import Round
from tests.test_train import pslm, start_run


def test_versions_validate_and_accumulate() -> None:
    doc = Steering().change("set", {"lr": 1e-4})
    doc = doc.change("pause", {}).change("set", {"clip": 1.0})
    assert (doc.version, doc.lr, doc.clip, doc.paused) == (3, 1e-4, 1.0, True)
    assert doc.overrides() == {"lr": 1e-4, "clip_norm": 1.0}
    assert doc.change("checkpoint", {}).checkpoints == 1
    assert Steering.from_dict(doc.to_dict()) == doc
    bad = [("set", {}), ("set", {"lr": -1}), ("set", {"lr": float("nan")}),
           ("set", {"momentum": 0.9}), ("pause", {"lr": 1}), ("jump", {})]  # fmt: skip
    for action, values in bad:
        with pytest.raises(ConfigError):
            doc.change(action, values)
    assert parse_assignments(["lr=3e-4", "weight-decay=0.1"]) == {"lr": 3e-4, "weight_decay": 0.1}
    assert parse_assignments(["consistency=SSP:3"]) == {"consistency": "ssp:3"}
    assert doc.change("set", {"consistency": "asp"}).consistency == "asp"
    for bad in (["lr"], ["lr=fast"], ["consistency=local:4"], ["consistency=sometimes"], ["b=1"]):
        with pytest.raises(ConfigError):
            parse_assignments(bad)
    log = SteeringLog()
    log.add(doc)
    assert log.get(3) == doc and log.get(2) is None and log.newest == doc


def test_min_scalars_reduce_by_minimum_and_lr_scales_the_schedule() -> None:
    rnd = Round()
    for share, (weight, known) in enumerate([(1.0, 4.0), (3.0, 2.0)]):
        rnd.pushes[share] = (weight, [])
        rnd.scalars[share] = {"loss": 1.0 + share, KNOWN: known}
    assert rnd.mean_scalars() == {"loss": 1.75, KNOWN: 2.0}
    cosine = ScheduleConfig(kind="cosine", warmup_steps=10, decay_steps=100, min_lr=1e-4)
    opt = OptimizerConfig(lr=1e-3, schedule=cosine)
    half = opt.steered({"lr": 5e-4})
    for step in (0, 50, 99, 150):
        assert half.lr_at(step) == pytest.approx(opt.lr_at(step) / 2)
    assert opt.steered({"lr": 0.0}).lr_at(150) == 0.0


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def _wait_for(what: str, check: Any, proc: subprocess.Popen[str], limit: float = 60) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        assert proc.poll() is None, f"training ended before {what}"
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {limit:g} s")


def _steered(run: Path, version: int) -> dict[str, Any] | None:
    for r in _records(run):
        if r.get("steering", {}).get("version") == version:
            return r
    return None


def test_ctl_set_pause_resume_checkpoint_and_resume(tmp_path: Path) -> None:
    # every checkpoint kept: should the run reach its last step before the SIGINT, its final
    # checkpoint must not delete the two this test reads
    train, run = start_run(tmp_path, 600, "--train.keep_checkpoints", "10")
    try:
        _wait_for("a step", lambda: _records(run), train)

        def ctl(*args: str) -> str:
            res = pslm("ctl", "--run", run, *args, timeout=30)
            assert res.returncode == 0, res.stderr
            return res.stdout

        assert "worker-1" in ctl("status")
        ctl("set", "lr=0")
        changed = _wait_for("the lr change", lambda: _steered(run, 1), train)
        start = changed["steering"]["from_step"]
        ctl("checkpoint")
        ckpt = _wait_for("the first checkpoint", lambda: _steered(run, 2), train)
        ctl("pause")
        asked = _records(run)[-1]["step"]  # logged by the time the request was answered
        paused = _wait_for("the pause", lambda: _steered(run, 3), train)
        stop = paused["steering"]["from_step"]
        assert stop - asked <= 3, (asked, stop)  # all stop at one clock, within a few steps
        time.sleep(1.0)  # an observation window: nothing may be logged past the pause
        assert max(r["step"] for r in _records(run)) == stop - 1
        ctl("resume")
        _wait_for("steps after the pause", lambda: _records(run)[-1]["step"] > stop + 5, train)
        ctl("checkpoint")
        ckpt2 = _wait_for("the second checkpoint", lambda: _steered(run, 5), train)
    finally:
        train.send_signal(signal.SIGINT)
        _, err = train.communicate(timeout=60)
    records = _records(run)
    lrs = {r["step"]: r["lr"] for r in records}
    assert all(lrs[s] > 0 for s in range(start)) and all(lrs[s] == 0 for s in lrs if s >= start)
    resumed = next(r for r in records if r["step"] == stop)
    assert resumed["paused_s"] >= 1.0
    # lr 0 from `start` on, on every shard: the checkpoints after it hold the same parameters
    first = run / "checkpoints" / f"step_{ckpt['step'] + 1:07d}"
    second = run / "checkpoints" / f"step_{ckpt2['step'] + 1:07d}"
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert ckpt2["step"] > ckpt["step"] >= start and all(a[k].equal(b[k]) for k in a)
    assert json.loads((second / "meta.json").read_text())["steering"]["lr"] == 0.0

    with (run / "metrics.jsonl").open("a") as f:  # as a kill mid-line leaves it
        f.write('{"step": 599, "loss": 2.5, "staleness_hist": {"0": 3}')
    # the newest checkpoint damaged: the resume goes back to the first (lr 0 already) and
    # moves the damaged one aside, so that the run can write that step again
    shard = sorted(second.glob("shard-*"))[-1]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    res = pslm("train", "--resume", run, timeout=300)  # the live settings stay set
    assert res.returncode == 0, res.stderr
    said = " ".join(res.stdout.split())  # (the console wraps long lines)
    assert f"skipped checkpoint {second.name}: {shard.name} changed" in said
    assert f"from {first.name}" in said and (run / "checkpoints" / "damaged" / second.name).is_dir()
    records = _records(run)
    steps = [r["step"] for r in records]
    assert steps == list(range(600))  # none lost, none repeated: pause, resume, restart
    assert all(r["lr"] == 0 for r in records if r["step"] > ckpt2["step"])


def test_ctl_removes_a_worker_and_adds_one_back(tmp_path: Path) -> None:
    train, run = start_run(tmp_path, 800)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return pslm("ctl", "--run", run, *args, timeout=30)

    def trained_by(who: list[int]) -> bool:
        return any(r["trained_by"] == who for r in _records(run)[-3:])

    try:
        _wait_for("a step", lambda: _records(run), train)
        refused = ctl("add-worker")  # all there: nothing to add
        assert refused.returncode == 1 and "has its 2 workers" in refused.stderr

        def reported() -> bool:  # whether its shares can move (with its heartbeats)
            nodes = json.loads(ctl("status", "--json").stdout)["nodes"]
            return all("shares_move" in n["stats"] for n in nodes if n["role"] == "worker")

        _wait_for("the workers' first reports", reported, train)
        res = ctl("remove-worker", "worker-1")
        assert res.returncode == 0, res.stderr
        _wait_for("worker-0 training both shares", lambda: trained_by([0, 0]), train)

        def left() -> bool:
            doc = json.loads((run / "cluster.json").read_text())
            return any(n["id"] == "worker-1" and n["state"] == "exited" for n in doc["nodes"])

        _wait_for("worker-1 to leave", left, train)
        assert "worker-1 left the job (removed)" in (run / "logs" / "scheduler.log").read_text()
        last = ctl("remove-worker", "worker-0")
        assert last.returncode == 1 and "last worker" in last.stderr
        res = ctl("add-worker")
        assert res.returncode == 0, res.stderr
        _wait_for("the new worker training share 1", lambda: trained_by([0, 1]), train)
        _, err = train.communicate(timeout=300)
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGINT)
            train.communicate(timeout=60)
    assert train.returncode == 0, err
    assert [r["step"] for r in _records(run)] == list(range(800))  # every step once


def test_ctl_changes_the_consistency_model_of_a_running_job(tmp_path: Path) -> None:
    train, run = start_run(tmp_path, 400, "--slow-worker", "1:3")

    def switched(model: str) -> dict[str, Any] | None:
        return next(
            (r for r in _records(run) if r.get("consistency", {}).get("model") == model), None
        )

    try:
        _wait_for("a step", lambda: _records(run), train)
        res = pslm("ctl", "--run", run, "set", "consistency=ssp:2", timeout=30)
        assert res.returncode == 0, res.stderr
        to_ssp = _wait_for("the change to ssp:2", lambda: switched("ssp:2"), train)
        start = to_ssp["consistency"]["from_step"]
        _wait_for("steps under ssp", lambda: _records(run)[-1]["step"] > start + 40, train)
        res = pslm("ctl", "--run", run, "set", "consistency=bsp", timeout=30)
        assert res.returncode == 0, res.stderr
        back = _wait_for("the change back to bsp", lambda: switched("bsp"), train)["consistency"]
        bad = pslm("ctl", "--run", run, "set", "consistency=local:4", timeout=30)
        assert bad.returncode == 1 and "local SGD" in bad.stderr
        _, err = train.communicate(timeout=300)
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGINT)
            train.communicate(timeout=60)
    assert train.returncode == 0, err
    records = _records(run)
    assert [r["step"] for r in records] == list(range(400))  # every step once, across both
    ssp = [r for r in records if start <= r["step"] < back["from_step"]]
    assert all(r["staleness"] <= 2 for r in ssp) and any(r["staleness"] > 0 for r in ssp)
    assert all(r["staleness"] == 0 for r in records if r["step"] >= back["from_step"])
    assert all(r["trained_by"] == [0, 1] for r in records if r["step"] >= back["from_step"])
    logs = [p.read_text() for p in sorted((run / "logs").glob("server-*.log"))]
    changes = [line.split("from clock ")[1] for log in logs for line in log.splitlines()
               if "consistency model bsp -> ssp:2" in line]  # fmt: skip
    assert len(changes) >= 2 and len(set(changes)) == 1  # every server at the same clock
