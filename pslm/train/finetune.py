"""Fine-tuning a pretrained run on labelled text, and evaluating the result.

    finetune(Path("runs/bbc"), "bbc-news", flags)   # a new run: head + pretrained trunk, on PS
    result = evaluate_classifier(Path("runs/bbc-news-ft-..."))   # test split, with the baseline

``pslm finetune`` takes the pretrained run's model shape, tokenizer and newest checkpoint,
splits the labelled data (deduplicated, stratified, from ``--split-seed``), prepares the split
in the new run's ``data/`` and trains on the same cluster machinery as ``pslm train`` (any
consistency model, failures, resume). ``pslm eval`` on such a run predicts the test split with
the newest checkpoint, computes the metrics with scikit-learn, trains the TF-IDF + logistic
regression baseline on the same split, and writes ``eval.json`` and ``predictions.jsonl``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError
from pslm.lm.checkpoint import latest_checkpoint, load_classifier
from pslm.lm.classifier import Encoded, GPTClassifier, classify
from pslm.lm.corpus import load_corpus
from pslm.lm.labelled import Labelled, Split, load_labelled
from pslm.lm.tokenizer import load_tokenizer
from pslm.train.baseline import language_of, run_baseline
from pslm.train.config import TrainConfig, dump_toml, load_config
from pslm.train.metrics import classification_metrics
from pslm.train.tasks import ClassifyData, load_data, prepare_classify

DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {
        "steps": 600,
        "batch_size": 16,
        "eval_interval": 50,
        "eval_iters": 8,
        "checkpoint_interval": 100,
        "sample_tokens": 0,
    },
    "optim": {"lr": 3e-4, "min_lr": 3e-5, "weight_decay": 0.01},
}
"""Fine-tuning's own defaults (flags override them)."""


def plan(pretrained: Path, data_spec: str, overrides: dict[str, dict[str, Any]]) -> TrainConfig:
    """The configuration of a fine-tuning run of ``pretrained`` on ``data_spec``."""
    if not (pretrained / "config.toml").is_file():
        raise ConfigError(f"no pretrained run at {pretrained} (it has no config.toml)")
    base = load_config(pretrained / "config.toml")
    if base.finetune.task:
        raise ConfigError(f"{pretrained} is a fine-tuning run; give the pretrained run")
    checkpoint = latest_checkpoint(pretrained)
    if checkpoint is None:
        raise ConfigError(f"{pretrained} has no complete checkpoint to fine-tune")
    cfg = TrainConfig(model=base.model, data=replace(base.data, name=data_spec))
    cfg = cfg.override(**DEFAULTS).override(**overrides)
    finetune = replace(
        cfg.finetune,
        task="classify",
        pretrained=str(checkpoint.resolve()),
        labels=["?", "?"],  # until the data is read
    )
    return replace(cfg, finetune=finetune)


def labelled(cfg: TrainConfig) -> tuple[TrainConfig, Labelled, Split]:
    """The labelled data ``cfg`` names and its split (``cfg.finetune``), and ``cfg`` with the
    data's labels."""
    data = load_labelled(cfg.data.name)
    f = cfg.finetune
    split = (
        data.fold_split(f.folds, f.fold, seed=f.split_seed)
        if f.folds
        else data.split(seed=f.split_seed)
    )
    return replace(cfg, finetune=replace(f, labels=data.labels)), data, split


def recorded(cfg: TrainConfig, run_dir: Path | None) -> TrainConfig:
    """What a fine-tuning run of ``cfg`` (with its labels) in ``run_dir`` records as its
    config.toml (``run_dir`` None: empty, the run makes one up as it starts)."""
    return replace(cfg, run_dir=str(run_dir) if run_dir else "").resolved()


def prepare_run(
    cfg: TrainConfig, pretrained: Path, run_dir: Path
) -> tuple[TrainConfig, ClassifyData, dict[str, Any]]:
    """Read, clean and split the labelled data; write the run's config, tokenizer and data.
    Returns the config, the prepared data and what ``data.json`` records of them."""
    cfg, data, split = labelled(cfg)
    cfg = recorded(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pretrained / "tokenizer.json", run_dir / "tokenizer.json")
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    block = cfg.model.gpt(tokenizer.vocab_size).block_size
    prepared = prepare_classify(
        run_dir / "data",
        split,
        tokenizer,
        block,
        Path(cfg.finetune.pretrained),
        windows=cfg.finetune.windows,
    )
    (run_dir / "config.toml").write_text(dump_toml(cfg.to_dict()))
    record = {
        "labelled": data.name,
        "texts": len(data),
        "repeats_removed": data.repeats,
        "conflicting_dropped": data.dropped,
        "split": {k: len(getattr(split, k)) for k in ("train", "val", "test")},
        "pretrained": cfg.finetune.pretrained,
        "pretraining_saw": pretraining_saw(pretrained, split),
    }
    (run_dir / "data.json").write_text(json.dumps(record, indent=2) + "\n")
    return cfg, prepared, record


def pretraining_saw(pretrained: Path, split: Split) -> dict[str, int] | None:
    """How many texts of each part of ``split`` are documents of the corpus ``pretrained`` was
    trained on (unlabelled, but seen): None if that corpus cannot be read any more."""
    try:
        corpus = load_corpus(load_config(pretrained / "config.toml").data.name)
    except ConfigError:
        return None
    docs = {d.strip() for d in corpus.documents}
    return {
        k: sum(t.strip() in docs for t in getattr(split, k).texts) for k in ("train", "val", "test")
    }


def predict(model: GPTClassifier, enc: Encoded) -> tuple[list[int], list[list[float]]]:
    """Predicted label indices and probabilities of encoded texts (their windows averaged)."""
    p = classify(model, enc)
    preds = p.argmax(dim=-1).tolist()
    return preds, [[round(v, 6) for v in row] for row in p.tolist()]


def evaluate_classifier(
    run_dir: Path, *, checkpoint: str | None = None, baseline: bool = True
) -> dict[str, Any]:
    """Test-split metrics of a fine-tuned run, beside the TF-IDF baseline's; written to
    ``eval.json`` and ``predictions.jsonl`` in the run."""
    started = time.perf_counter()
    model, _, meta = load_classifier(run_dir, checkpoint)
    data = load_data(run_dir / "data")
    if not isinstance(data, ClassifyData):
        raise ConfigError(f"{run_dir} has no labelled split in data/")
    if data.labels != meta["labels"]:
        raise ConfigError(f"the checkpoint's labels {meta['labels']} are not the split's")
    enc, y = data.arrays("test")
    unknown = sorted({int(t) for t in y if not 0 <= int(t) < len(data.labels)})
    if unknown:
        raise ConfigError(f"test labels {unknown} are unknown to the model")
    preds, probs = predict(model, enc)
    report = classification_metrics([int(t) for t in y], preds, data.labels)
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (t, p, pr) in enumerate(zip(y.tolist(), preds, probs, strict=True)):
            f.write(json.dumps({"index": i, "target": t, "prediction": p, "probs": pr}) + "\n")
    result: dict[str, Any] = {
        "run": str(run_dir),
        "step": meta.get("step"),
        "labels": data.labels,
        "model": report,
    }
    if baseline:
        split = Split(data.texts("train"), data.texts("val"), data.texts("test"))
        language = language_of(split.train.texts)
        base = run_baseline(split, language=language)
        result["baseline"] = {
            "name": f"TF-IDF ({base.features} features, {language}) + logistic regression",
            **classification_metrics(split.test.targets, base.predictions, data.labels),
        }
    result["seconds"] = round(time.perf_counter() - started, 2)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
