"""`pslm train`, `pslm generate`, `pslm eval` end to end, as a user runs them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO, alive

CONFIG = """
[model]
preset = "tiny"
block_size = 32
[data]
tokenizer = "char"
[train]
steps = 30
batch_size = 8
eval_interval = 10
eval_iters = 4
checkpoint_interval = 10
keep_checkpoints = 2
sample_tokens = 20
seed = 5
"""


def _story(n_words: int = 30_000) -> str:
    rng = random.Random(0)
    words = "the a king queen river stone light dark walked spoke softly under over".split()
    lines = []
    for _ in range(n_words // 10):
        line = " ".join(rng.choice(words) for _ in range(10))
        lines.append(line.capitalize() + rng.choice([".", "!", "?"]))
    return "\n".join(lines) + "\n"


def start_run(
    tmp_path: Path, steps: int, *extra: str, interval: int = 5000, name: str = "run"
) -> tuple[subprocess.Popen[str], Path]:
    """`pslm train` of the tiny CONFIG in the background, ``steps`` steps, evaluating and
    checkpointing every ``interval``, on tmp_path/story.txt (written if missing): the process
    (stderr piped) and its run directory."""
    story = tmp_path / "story.txt"
    if not story.exists():
        story.write_text(_story())
    config = CONFIG.replace("steps = 30", f"steps = {steps}")
    (tmp_path / "long.toml").write_text(config.replace("interval = 10", f"interval = {interval}"))
    run = tmp_path / name
    argv = [sys.executable, "-m", "pslm", "train", "--config", str(tmp_path / "long.toml")]
    argv += ["--data", str(story), "--run-dir", str(run), *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), run


def pslm(*args: str | Path, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pslm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=kw.pop("cwd", REPO),
        **kw,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    (root / "story.txt").write_text(_story())
    (root / "tiny.toml").write_text(CONFIG)
    return {"root": root, "corpus": root / "story.txt", "config": root / "tiny.toml"}


def train(setup: dict[str, Path], name: str, *extra: str) -> Path:
    run = setup["root"] / name
    res = pslm(
        "train", "--config", setup["config"], "--data", setup["corpus"], "--run-dir", run, *extra
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return run


@pytest.fixture(scope="module")
def run(setup) -> Path:
    return train(setup, "w2s2", "--workers", "2", "--servers", "2")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_losses_do_not_depend_on_the_number_of_workers_or_servers(setup, run) -> None:
    (setup["root"] / "w1s1").mkdir()  # an existing empty run directory is fine
    one = metrics(train(setup, "w1s1", "--workers", "1", "--servers", "1"))
    two_one = metrics(train(setup, "w2s1", "--workers", "2", "--servers", "1"))
    two_two = metrics(run)
    assert len(one) == len(two_two) == len(two_one) == 30
    for a, b, c in zip(one, two_two, two_one, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(b["loss"] - c["loss"]) < 1e-4, a["step"]
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
            assert abs(b["val_loss"] - c["val_loss"]) < 1e-4
    assert one[-1]["loss"] < one[0]["loss"] - 0.5  # and it learns


def test_run_directory_holds_what_design_promises(run) -> None:
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["run_dir"] == str(run) and cfg["train"]["steps"] == 30
    assert cfg["model"]["preset"] == "tiny" and cfg["cluster"]["workers"] == 2
    cluster = json.loads((run / "cluster.json").read_text())
    assert sorted(n["id"] for n in cluster["nodes"]) == [
        "server-0",
        "server-1",
        "server-2",  # the backups
        "server-3",
        "worker-0",
        "worker-1",
    ]
    recs = metrics(run)
    for key in (
        "step",
        "time",
        "loss",
        "lr",
        "tokens_per_s",
        "compute_s",
        "comm_s",
        "wait_s",
        "version",
        "bytes_pushed",
        "bytes_pulled",
    ):
        assert key in recs[0], key
    assert [r["step"] for r in recs if "val_loss" in r] == [9, 19, 29]
    assert [r["version"] for r in recs] == list(range(1, 31))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_0000020", "step_0000030"]  # the last two; no temporary left
    last = run / "checkpoints" / "step_0000030"
    assert sorted(p.name for p in last.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "shard-000-of-002.safetensors",
        "shard-001-of-002.safetensors",
    ]
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == 30 and meta["version"] == 30 and meta["model"]["n_layer"] == 2
    assert (run / "tokenizer.json").exists()


def test_generation_is_seeded_and_the_kv_cache_changes_nothing(run) -> None:
    def gen(*args: str) -> str:
        res = pslm("generate", "--run", run, "--prompt", "The king", "--max-tokens", "60", *args)
        assert res.returncode == 0, res.stderr
        return res.stdout

    greedy = gen("--temperature", "0")
    assert greedy.startswith("The king") and len(greedy) > 60
    assert gen("--temperature", "0", "--no-cache") == greedy  # 60 tokens run past block 32
    sampled = gen("--temperature", "1", "--seed", "3")
    assert gen("--temperature", "1", "--seed", "3", "--no-cache") == sampled
    assert gen("--temperature", "1", "--seed", "4") != sampled


def test_eval_reproduces_the_last_validation_loss(run, tmp_path) -> None:
    res = pslm("eval", "--run", run, "--iters", "4", "--json", cwd=tmp_path)  # any cwd
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    last = metrics(run)[-1]
    assert out["step"] == 30 and out["val_loss"] == pytest.approx(last["val_loss"], abs=1e-4)
    assert out["perplexity"] == pytest.approx(2.718281828 ** out["val_loss"], rel=1e-6)
    text = pslm("eval", "--run", run, "--iters", "4").stdout
    assert "val loss" in text and "perplexity" in text


def _snapshot(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_bad_input_is_one_line_and_overwrites_nothing(setup, run, tmp_path) -> None:
    before = _snapshot(run)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    corrupt = tmp_path / "corrupt"
    (corrupt / "checkpoints" / "step_0000030").mkdir(parents=True)
    for name in ("tokenizer.json", "config.toml"):
        (corrupt / name).write_bytes((run / name).read_bytes())
    src = run / "checkpoints" / "step_0000030"
    (corrupt / "checkpoints" / "step_0000030" / "meta.json").write_bytes(
        (src / "meta.json").read_bytes()
    )
    (corrupt / "checkpoints" / "step_0000030" / "model.safetensors").write_bytes(
        (src / "model.safetensors").read_bytes()[:100]
    )
    cases = [
        (["train", "--data", "no-such-corpus", "--run-dir", tmp_path / "a"], "unknown corpus"),
        (["train", "--data", empty, "--run-dir", tmp_path / "b"], "has no text"),
        (
            ["train", "--config", setup["config"], "--data", setup["corpus"], "--run-dir", run],
            "already exists",
        ),
        (["train", "--steps", "0", "--run-dir", tmp_path / "c"], "steps must be >= 1"),
        (["train", "--model", "huge", "--run-dir", tmp_path / "d"], "unknown model preset"),
        (["generate", "--run", tmp_path / "missing"], "no run directory"),
        (["eval", "--run", tmp_path / "missing"], "no run directory"),
        (["generate", "--run", corrupt], "corrupt"),
        (["eval", "--run", corrupt], "corrupt"),
        (["generate", "--run", run, "--prompt", "Zebra 中"], "not in this tokenizer"),
        (["train", "--device", "cuda", "--run-dir", tmp_path / "e"], "no CUDA"),
    ]
    with ThreadPoolExecutor(2) as pool:  # real processes, two at a time
        results = list(pool.map(lambda case: pslm(*case[0]), cases))
    for (args, fragment), res in zip(cases, results, strict=True):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1, (args, res.stderr)
        assert len(lines) == 1 and fragment in lines[0], (args, res.stderr)
    assert _snapshot(run) == before
    assert not any((tmp_path / d).exists() for d in "abcde")


def test_bad_settings_fail_before_any_work(setup, tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    odd = tmp_path / "odd.toml"
    odd.write_text(CONFIG.replace("[train]", '[train]\nsample_prompt = "Zebra §"'))
    cases = [
        (["--block-size", "0"], "--block-size must be >= 1"),
        (["--run-dir", afile], "is a file"),
        (["--config", odd, "--run-dir", tmp_path / "p"], "not in this tokenizer"),
    ]
    for extra, fragment in cases:
        args = ["train", "--config", setup["config"], "--data", setup["corpus"], *extra]
        res = pslm(
            *(args if "--run-dir" in map(str, extra) else [*args, "--run-dir", tmp_path / "q"])
        )
        assert res.returncode == 1 and fragment in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_eval_refuses_a_corpus_that_changed(setup, tmp_path) -> None:
    corpus = tmp_path / "story.txt"
    corpus.write_text(_story(3000))
    run = tmp_path / "r"
    res = pslm(
        "train",
        "--config",
        setup["config"],
        "--data",
        corpus,
        "--run-dir",
        run,
        "--steps",
        "3",
        "--workers",
        "1",
        "--servers",
        "1",
    )
    assert res.returncode == 0, res.stderr
    corpus.write_text(_story(3000) + "The end.\n")
    res = pslm("eval", "--run", run, "--iters", "2")
    assert res.returncode == 1 and "changed since" in res.stderr


def _wait_for(predicate, what: str, within: float = 120.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _pids(run: Path, nodes: int = 6) -> list[int]:
    """The pids of the scheduler and the ``nodes`` nodes (2 servers have 2 backups)."""
    try:
        doc = json.loads((run / "cluster.json").read_text())
    except (OSError, ValueError):
        return []
    pids = [n["pid"] for n in doc["nodes"]]
    return [doc["scheduler"]["pid"], *pids] if len(pids) == nodes else []


@pytest.mark.parametrize("how", ["ctrl-c", "kill-group"])
def test_interrupted_training_leaves_no_process_and_keeps_checkpoints(setup, tmp_path, how):
    run = tmp_path / "long"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pslm",
            "train",
            "--config",
            setup["config"],
            "--data",
            setup["corpus"],
            "--run-dir",
            str(run),
            "--steps",
            "100000",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pids = _wait_for(lambda: _pids(run), "the cluster")
        _wait_for(lambda: (run / "checkpoints" / "step_0000010").exists(), "a checkpoint")
        # as if the signal came while a checkpoint was being written (it may: one every 10 steps)
        (run / "checkpoints" / ".tmp-step_0099990").mkdir()
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_for(lambda: not any(alive(p) for p in pids), "every process to end", within=20)
    if how == "ctrl-c":
        assert proc.returncode == 130 and "Last checkpoint" in out + err
        assert "Traceback" not in out + err
    res = pslm("generate", "--run", run, "--max-tokens", "5", "--seed", "1")
    assert res.returncode == 0, res.stderr  # the newest complete checkpoint still loads
    assert (
        not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        or how == "kill-group"
    )


@pytest.mark.slow
def test_train_with_no_arguments_end_to_end(tmp_path) -> None:
    res = pslm("train", cwd=tmp_path, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    recs = metrics(run)
    assert len(recs) == 1200 and recs[-1]["val_loss"] < recs[0]["loss"] - 2
    assert (run / "checkpoints" / "step_0001200" / "model.safetensors").exists()
    assert "sample" in res.stdout


def _finite_checkpoint(run: Path) -> None:
    from safetensors.torch import load_file

    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    files = sorted(newest.glob("*.safetensors"))
    assert len(files) == 3  # the model and both shards, optimizer state included
    for f in files:
        for name, t in load_file(str(f)).items():
            assert bool(t.isfinite().all()), (f.name, name)


@pytest.mark.parametrize(
    ("consistency", "codec"), [("bsp", "none"), ("asp", "none"), ("bsp", "int8")]
)
def test_nan_gradients_are_skipped_and_the_run_goes_on(setup, run, consistency, codec) -> None:
    """Also through a lossy codec: a NaN must not reach its error feedback (every later push
    would be NaN) nor int8 (which refuses it)."""
    out = train(
        setup,
        f"nan-{consistency}-{codec}",
        "--workers", "2", "--servers", "2", "--replicas", "1",
        "--consistency", consistency, "--push-codec", codec,
        "--train.nan_grads", "1:3-5",
    )  # fmt: skip
    records = metrics(out)
    assert len(records) == 30 and records[-1]["val_loss"] < records[0]["loss"] - 0.5
    if codec != "none":
        assert [r["step"] for r in records if "skipped" in r] == [3, 4, 5]
    elif consistency == "bsp":  # every shard skipped the same clocks, the version went on
        assert [r["step"] for r in records if "skipped" in r] == [3, 4, 5]
        assert all(r["skipped"] == "a gradient was not finite" for r in records[3:6])
        assert [r["version"] for r in records] == list(range(1, 31))
        before = metrics(run)  # the undisturbed run of the same cluster
        assert [r["loss"] for r in records[:3]] == [r["loss"] for r in before[:3]]
        assert records[6]["loss"] != before[6]["loss"]  # three updates fewer
    else:  # worker 1's three pushes, as worker 0's records count them
        assert max(r.get("skipped_pushes", 0) for r in records) == 3
    _finite_checkpoint(out)


def test_too_many_skips_in_a_row_stop_the_run_with_a_clear_error(setup) -> None:
    out = setup["root"] / "diverged"
    res = pslm(
        "train", "--config", setup["config"], "--data", setup["corpus"], "--run-dir", out,
        "--workers", "2", "--servers", "1", "--train.nan_grads", "0:2-29",
        "--train.max_skips", "3",
    )  # fmt: skip
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "worker-0 exited with code 4" in last or "worker-1 exited with code 4" in last
    assert "3 steps in a row (the last: step 4 in metrics.jsonl)" in last
    assert [r["step"] for r in metrics(out) if "skipped" in r] == [2, 3, 4]
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
