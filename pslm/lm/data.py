"""Token files and global batches.

    data = prepare(load_corpus("bbc-news"), tokenizer="bpe", vocab_size=4096)  # cached
    train = data.tokens("train")                     # np.memmap of uint16/uint32 tokens
    batches = GlobalBatches(len(train), block_size=128, batch_size=16, seed=1337)
    lo, hi = worker_slice(rank, num_workers, 16)     # this worker's rows of every batch
    x, y = get_batch(train, batches.offsets(step)[lo:hi], 128)

Preparation shuffles the documents with a fixed seed (so that the validation split is not one
topic), holds out the last ``val_fraction`` of them (of the characters, for a single-document
corpus, as nanoGPT's shakespeare_char does), trains the tokenizer on the training part (a
character vocabulary covers all the text), and writes the token streams, documents separated
by end-of-text, as flat binary files. The result is cached under ``cache_dir`` by the corpus
fingerprint and the settings, and reused.

A global batch is drawn from (seed, step) alone, so every worker computes the same batch and
takes its rows: the data a step sees does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pslm.errors import ConfigError
from pslm.lm.corpus import Corpus
from pslm.lm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT = 1
SPLITS = ("train", "val")


def default_cache_dir() -> Path:
    """``$PSLM_CACHE`` or ``~/.cache/pslm``."""
    return Path(os.environ.get("PSLM_CACHE") or Path.home() / ".cache" / "pslm")


@dataclass(frozen=True, slots=True)
class PreparedData:
    """Token files of a corpus, with their tokenizer."""

    path: Path
    meta: dict[str, object]

    def tokens(self, split: str) -> np.memmap:
        """The token stream of ``split`` ("train" or "val"), memory-mapped read-only."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        return np.memmap(self.path / f"{split}.bin", dtype=str(self.meta["dtype"]), mode="r")

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / "tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return int(str(self.meta["vocab_size"]))


def prepare(
    corpus: Corpus,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    cache_dir: Path | None = None,
) -> PreparedData:
    """Token files for ``corpus`` (see the module docstring), from the cache when present."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    settings = {
        "format": FORMAT,
        "corpus": corpus.fingerprint,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size if tokenizer != "char" else 0,
        "val_fraction": val_fraction,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir or default_cache_dir()
    final = root / f"{_slug(corpus.name)}-{tokenizer}-{key}"
    if (final / "meta.json").exists():
        return PreparedData(final, json.loads((final / "meta.json").read_text()))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=root))
    try:
        meta = _build(corpus, tmp, tokenizer, vocab_size, val_fraction)
        (tmp / "meta.json").write_text(json.dumps({**settings, **meta}, indent=2))
        try:
            tmp.rename(final)
        except OSError:  # another process prepared the same data meanwhile: use theirs
            if not (final / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(final, json.loads((final / "meta.json").read_text()))


def _build(
    corpus: Corpus, out: Path, kind: str, vocab_size: int, val_fraction: float
) -> dict[str, object]:
    docs = list(corpus.documents)
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1.0 - val_fraction))
        train_docs, val_docs = [docs[0][:cut]], [docs[0][cut:]]
    else:
        random.Random(0).shuffle(docs)
        n_val = max(1, round(len(docs) * val_fraction))
        train_docs, val_docs = docs[:-n_val], docs[-n_val:]
    tok = train_tokenizer(kind, docs if kind == "char" else train_docs, vocab_size=vocab_size)
    tok.save(out / "tokenizer.json")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ids: list[int] = []
        for doc in split_docs:
            ids.extend(tok.encode(doc))
            ids.append(tok.eot_id)
        np.asarray(ids, dtype=dtype).tofile(out / f"{split}.bin")
        counts[split] = len(ids)
    return {
        "name": corpus.name,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "tokenizer_kind": kind,
        "documents": len(docs),
        "chars": corpus.chars,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "corpus"


class GlobalBatches:
    """Start offsets of the global batch of every step, drawn from (seed, step) alone."""

    def __init__(self, n_tokens: int, *, block_size: int, batch_size: int, seed: int):
        if n_tokens < block_size + 1:
            raise ConfigError(f"{n_tokens} tokens cannot fill one block of {block_size} + 1")
        self.high = n_tokens - block_size  # exclusive: the target window ends inside the data
        self.batch_size = batch_size
        self.seed = seed

    def offsets(self, step: int, stream: int = 0) -> np.ndarray:
        """The ``batch_size`` start offsets for ``step``; ``stream`` 1 draws evaluation batches."""
        rng = np.random.default_rng([self.seed, stream, step])
        return rng.integers(0, self.high, size=self.batch_size, dtype=np.int64)


def worker_slice(rank: int, num_workers: int, batch_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch that worker ``rank`` of ``num_workers`` trains on."""
    if batch_size < num_workers:
        raise ConfigError(f"global batch {batch_size} is smaller than {num_workers} workers")
    return rank * batch_size // num_workers, (rank + 1) * batch_size // num_workers


def get_batch(
    tokens: np.ndarray, offsets: np.ndarray, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (len(offsets), block_size) int64 each."""
    window = tokens[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64)
    t = torch.from_numpy(window)
    return t[:, :-1], t[:, 1:]
