"""SSP and ASP: the staleness gate, the bound it keeps, and what training gets from it."""

from __future__ import annotations

import ast
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pslm.bench.consistency import clock_bound, straggler_bounds
from pslm.errors import ConfigError
from pslm.ps.core.consistency import Consistency, StalenessGate
from tests.test_train import pslm


def test_parse_and_round_trip() -> None:
    assert Consistency.parse("bsp") == Consistency() and not Consistency().asynchronous
    ssp = Consistency.parse("ssp:3")
    assert (ssp.kind, ssp.bound, str(ssp)) == ("ssp", 3, "ssp:3") and ssp.asynchronous
    assert Consistency.parse("asp").bound is None
    local = Consistency.parse("local:4")
    assert (local.period, str(local), local.asynchronous) == (4, "local:4", False)
    assert Consistency.from_dict(local.to_dict()) == local
    assert Consistency.from_dict(ssp.to_dict()) == ssp
    for bad in ("ssp", "ssp:x", "bsp:1", "local", "local:0", "ssp:-1", "gossip"):
        with pytest.raises(ConfigError):
            Consistency.parse(bad)
    for raw in ({"kind": "ssp", "staleness": True}, {"kind": 3}, {"x": 1}, "bsp"):
        with pytest.raises(ConfigError):
            Consistency.from_dict(raw)


def test_gate_lets_a_worker_run_ahead_by_exactly_the_bound() -> None:
    gate = StalenessGate(num_workers=2, bound=2)
    for _ in range(2):
        gate.advance(0)
    assert gate.ready(2) and gate.staleness(2) == 2  # worker 1 still at clock 0
    assert not gate.ready(3)
    gate.advance(1)
    assert gate.ready(3) and gate.staleness(3) == 2
    asp = StalenessGate(num_workers=2, bound=None)
    for _ in range(50):
        asp.advance(0)
    assert asp.ready(50) and asp.staleness(50) == 50


def test_clock_bound_replays_the_straggler_draws() -> None:
    def one_pause(rank: int, step: int) -> float:  # worker 1's first step takes 6 units
        return 5.0 if (rank, step) == (1, 0) else 0.0

    assert clock_bound(lambda r, t: 0.0, 10, 2, 0) == clock_bound(lambda r, t: 0.0, 10, 2, None)
    assert clock_bound(one_pause, 10, 2, 0) == 15.0  # BSP: everybody waits out the pause
    # ASP: worker 0 goes on; the 20th share is done at 13 (worker 0: 1..13, worker 1: 6..12)
    assert clock_bound(one_pause, 10, 2, None) == 13.0
    ssp = [clock_bound(one_pause, 10, 2, b) for b in (0, 1, 3, None)]
    assert ssp == sorted(ssp, reverse=True) and ssp[1] > ssp[3]
    slow = clock_bound(lambda r, t: 1.0 if r == 1 else 0.0, 30, 2, None)  # one 2x slower
    assert slow == 40.0  # 60 shares: worker 0 trains 40 while worker 1 trains 20


def test_straggler_bounds_follow_the_number_of_workers() -> None:
    calm = straggler_bounds(50, "", "", workers=4)
    assert calm["ssp:3"] == calm["asp"] == 1.0  # nobody waits when nobody straggles
    two, four = (straggler_bounds(200, "", "0.1:5", workers=w) for w in (2, 4))
    for b in (two, four):
        assert 1.0 >= b["ssp:1"] >= b["ssp:3"] >= b["asp"]  # type: ignore[operator]
    # BSP waits for the slowest of four, so the others can win more by not waiting
    assert four["asp"] < two["asp"]  # type: ignore[operator]


def _train(setup: dict[str, Path], name: str, *extra: str) -> Path:
    run = setup["root"] / name
    res = pslm(
        "train", "--config", setup["config"], "--data", setup["corpus"], "--run-dir", run, *extra
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return run


def _server_staleness(run: Path) -> dict[int, int]:
    seen: dict[int, int] = {}
    for log in sorted((run / "logs").glob("server-*.log")):
        text = log.read_text()
        if "backup of shard" in text and "serving shard" not in text:
            continue  # a backup that never served: it saw no reads
        m = re.search(r"staleness of reads \(staleness: count\): (\{.*\})", text)
        assert m, log
        for k, v in ast.literal_eval(m.group(1)).items():
            seen[k] = seen.get(k, 0) + v
    return seen


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from tests.test_train import CONFIG, _story

    root = tmp_path_factory.mktemp("consistency")
    (root / "story.txt").write_text(_story())
    (root / "tiny.toml").write_text(CONFIG.replace("steps = 30", "steps = 40"))
    return {"root": root, "corpus": root / "story.txt", "config": root / "tiny.toml"}


@pytest.mark.parametrize("bound, overlap", [(0, False), (1, False), (3, False), (1, True)])
def test_ssp_bound_holds_with_a_worker_three_times_slower(setup, bound: int, overlap) -> None:
    flags = ["--consistency", f"ssp:{bound}", "--slow-worker", "1:3"]
    run = _train(setup, f"ssp{bound}-{overlap}", *flags, *(["--overlap"] if overlap else []))
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 40
    # worker 0 is the fast one: its reads run ahead of the slow worker up to the bound, and
    # never past it, by its own account and by every server's
    assert max(r["staleness"] for r in recs) == bound == recs[-1]["staleness_max"]
    assert max(_server_staleness(run)) == bound
    hists = [r["staleness_hist"] for r in recs if "staleness_hist" in r]
    assert len(hists) == 4 and sum(sum(h.values()) for h in hists) == 40
    assert max(int(k) for h in hists for k in h) == bound


def test_asp_never_waits_and_its_staleness_grows(setup) -> None:
    run = _train(setup, "asp", "--consistency", "asp", "--slow-worker", "1:3")
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["staleness_max"] > 3


@pytest.mark.slow  # (four runs of 400 steps; `pslm bench consistency` measures the same)
def test_ssp_asp_and_local_sgd_train_as_well_as_bsp_on_the_same_samples(setup) -> None:
    losses, pushed = {}, {}
    modes = ("bsp", "ssp:1", "asp", "local:4")

    def train(mode: str) -> Path:
        return _train(setup, f"q-{mode.replace(':', '')}", "--consistency", mode, "--steps", "400")

    with ThreadPoolExecutor(2) as pool:  # two runs at a time: the same samples either way
        runs = dict(zip(modes, pool.map(train, modes), strict=True))
    for mode, run in runs.items():
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = recs[-1]["val_loss"]
        pushed[mode] = sum(r["bytes_pushed"] for r in recs)
    for mode in ("ssp:1", "asp", "local:4"):
        assert losses[mode] <= 1.05 * losses["bsp"], (mode, losses)
    assert pushed["local:4"] * 3 < pushed["bsp"]  # an exchange every 4 steps (and evals)


def test_codecs_cut_the_bytes_and_change_nothing_else(setup) -> None:
    runs = {
        name: [
            json.loads(ln)
            for ln in (_train(setup, f"codec-{i}", *flags) / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        for i, (name, flags) in enumerate(
            {
                "none": (),
                "bf16": ("--push-codec", "bf16", "--pull-codec", "bf16"),
                "topk": ("--push-codec", "topk:0.1"),
            }.items()
        )
    }
    base = runs["none"][-1]
    assert runs["bf16"][-1]["bytes_pushed"] * 2 == base["bytes_pushed"]
    assert runs["bf16"][-1]["bytes_pulled"] * 2 == base["bytes_pulled"]
    assert runs["topk"][-1]["bytes_pushed"] < base["bytes_pushed"] / 4
    assert runs["bf16"][-1]["val_loss"] == pytest.approx(base["val_loss"], rel=0.02)
    assert runs["topk"][-1]["loss"] < runs["topk"][0]["loss"] - 0.5  # it still learns
    assert [r["step"] for r in runs["topk"]] == [r["step"] for r in runs["none"]]
