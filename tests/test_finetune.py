"""pslm finetune -> eval -> report, end to end on a tiny pretrained model, with real processes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pslm.errors import ConfigError
from pslm.train.finetune import evaluate_classifier
from tests.test_train import CONFIG, _story, pslm

WORDS = {
    "calm": "the river stone light softly under",
    "storm": "dark king queen walked spoke over",
}


def _labelled(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "calm" if i % 2 else "storm"
        words = [rng.choice(WORDS[label].split()) for _ in range(rng.randint(4, 12))]
        rows.append({"text": " ".join(words) + (" the" * (i % 7)), "label": label})
    return rows


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    (root / "story.txt").write_text(_story())
    (root / "tiny.toml").write_text(CONFIG)
    run = root / "pre"
    res = pslm(
        "train", "--config", root / "tiny.toml", "--data", root / "story.txt", "--run-dir", run
    )
    assert res.returncode == 0, res.stderr
    return run


def test_finetune_eval_and_report_end_to_end(pretrained: Path, tmp_path: Path) -> None:
    data = tmp_path / "labelled.jsonl"
    rows = _labelled(300) + _labelled(20)  # the second batch repeats texts: dedup removes them
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "ft"
    res = pslm(
        "finetune", "--run", pretrained, "--data", data, "--steps", "40", "--batch-size", "8",
        "--eval-interval", "20", "--servers", "1", "--run-dir", run,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test split" in res.stdout and "logistic regression" in res.stdout
    info = json.loads((run / "data.json").read_text())
    assert info["repeats_removed"] >= 20 and sum(info["split"].values()) == info["texts"]
    parts = {
        name: [
            json.loads(ln)["text"]
            for ln in (run / "data" / f"{name}.jsonl").read_text().splitlines()
        ]
        for name in ("train", "val", "test")
    }
    assert sum(map(len, parts.values())) == len(set().union(*parts.values()))  # disjoint
    counts = np.diff(np.load(run / "data" / "train_win.npy"))
    assert counts.min() == 1 and counts.max() > 1  # the longer texts are read in windows
    model = json.loads((run / "model.json").read_text())
    assert model["pooling"] == "mean" and model["windows"] == 8
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(40)) and "val_loss" in recs[-1]
    assert recs[-1]["loss"] < recs[0]["loss"]  # it learns

    from sklearn.metrics import accuracy_score, f1_score

    result = json.loads((run / "eval.json").read_text())
    preds = [json.loads(ln) for ln in (run / "predictions.jsonl").read_text().splitlines()]
    y = [p["target"] for p in preds]
    p_ = [p["prediction"] for p in preds]
    assert result["model"]["accuracy"] == pytest.approx(accuracy_score(y, p_))
    assert result["model"]["macro"]["f1"] == pytest.approx(f1_score(y, p_, average="macro"))
    assert len(preds) == info["split"]["test"] and "baseline" in result

    res = pslm("eval", "--run", run, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["model"] == result["model"]
    res = pslm("report", "--run", run)
    assert res.returncode == 0, res.stderr
    for name in ("loss_step", "loss_time", "tokens_per_s", "confusion_model"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    assert "accuracy" in (run / "report.md").read_text()

    # bad input: each one a clear error
    y_test = np.load(run / "data" / "test_y.npy")
    np.save(run / "data" / "test_y.npy", np.full_like(y_test, 5))
    res = pslm("eval", "--run", run)
    assert res.returncode == 1 and "unknown to the model" in res.stderr
    with pytest.raises(ConfigError, match="no classification head"):
        evaluate_classifier(pretrained)
    res = pslm("generate", "--run", run)
    assert res.returncode == 1 and "classification run" in res.stderr


def test_finetune_refuses_what_it_cannot_do(pretrained: Path, tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(
        "\n".join(json.dumps({"text": f"the river {i}", "label": "x"}) for i in range(9))
    )
    cases = [
        (["--data", one], "two labels or more"),
        (["--data", tmp_path / "none.jsonl"], "unknown labelled data"),
    ]
    for extra, fragment in cases:
        res = pslm("finetune", "--run", pretrained, *extra, "--run-dir", tmp_path / "x")
        assert res.returncode == 1 and fragment in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    res = pslm("finetune", "--run", tmp_path, "--data", one)
    assert res.returncode == 1 and "no pretrained run" in res.stderr
