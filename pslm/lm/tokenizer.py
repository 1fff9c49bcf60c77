"""Tokenizers: byte-level BPE (trained with the ``tokenizers`` library) and characters.

    tok = train_tokenizer("bpe", texts, vocab_size=4096)
    ids = tok.encode("Hello, 世界")
    assert tok.decode(ids) == "Hello, 世界"      # any UTF-8 text round-trips exactly
    tok.save("run/tokenizer.json"); tok = load_tokenizer("run/tokenizer.json")

Byte-level BPE works on UTF-8 bytes, so it has no unknown characters and round-trips Chinese
as exactly as English. ``bpe-jieba`` is the same BPE with jieba's word segmentation as its
pre-tokenisation (Chinese has no spaces to stop merges at): trained on jieba's words, it
encodes a text word by word, so merges never cross a word boundary, and still round-trips
exactly (nothing is inserted between the words). The character tokenizer has one token per
character seen in training (nanoGPT's shakespeare_char) and refuses characters it has not
seen. All reserve an end-of-text token that separates documents.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from pslm.errors import ConfigError

EOT = "<|endoftext|>"
KINDS = ("bpe", "bpe-jieba", "char")


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


class CharTokenizer:
    """One token per character; id 0 is end-of-text, the rest follow in code-point order."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars) - {""})
        if any(len(c) != 1 for c in self.chars):
            raise ConfigError("a character vocabulary holds single characters only")
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 1
        self.eot_id = 0

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as exc:
            raise ConfigError(
                f"character {exc.args[0]!r} is not in this tokenizer's vocabulary"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "" for i in ids)

    def save(self, path: str | Path) -> None:
        doc = {"pslm_tokenizer": "char", "chars": "".join(self.chars)}
        Path(path).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library."""

    kind = "bpe"

    def __init__(self, tok: object):
        from tokenizers import Tokenizer as HFTokenizer

        assert isinstance(tok, HFTokenizer)
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise ConfigError(f"BPE tokenizer has no {EOT} token")
        self.eot_id = eot

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.tok.to_str(), encoding="utf-8")


class JiebaBPETokenizer(BPETokenizer):
    """Byte-level BPE over jieba's words (``bpe-jieba``)."""

    kind = "bpe-jieba"

    def __init__(self, tok: object):
        super().__init__(tok)
        self.cut = _jieba()

    def encode(self, text: str) -> list[int]:
        words = [w for w in self.cut(text) if w]
        return [i for enc in self.tok.encode_batch(words) for i in enc.ids]

    def save(self, path: str | Path) -> None:
        doc = {"pslm_tokenizer": "bpe-jieba", "bpe": json.loads(self.tok.to_str())}
        Path(path).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def _jieba() -> Callable[[str], Iterable[str]]:
    try:
        import jieba
    except ImportError:
        raise ConfigError("the bpe-jieba tokenizer needs jieba: pip install 'pslm[zh]'") from None
    jieba.setLogLevel(60)  # no "Building prefix dict" chatter
    cut: Callable[[str], Iterable[str]] = jieba.cut
    return cut


def train_tokenizer(kind: str, texts: Sequence[str], *, vocab_size: int = 4096) -> Tokenizer:
    """A tokenizer of ``kind`` (``KINDS``) trained on ``texts``."""
    if kind == "char":
        return CharTokenizer(c for t in texts for c in set(t))
    if kind not in ("bpe", "bpe-jieba"):
        raise ConfigError(f"unknown tokenizer {kind!r}; choose from {KINDS}")
    if vocab_size < 257 + 1:
        raise ConfigError(f"a byte-level BPE vocabulary needs > 257 tokens, got {vocab_size}")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if kind == "bpe-jieba":
        cut = _jieba()
        tok.train_from_iterator((w for t in texts for w in cut(t) if w), trainer=trainer)
        return JiebaBPETokenizer(tok)
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved at ``path``; ConfigError if it is missing or not a tokenizer."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        doc = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read tokenizer {path}: {exc}") from None
    if isinstance(doc, dict) and doc.get("pslm_tokenizer") == "char":
        return CharTokenizer(str(doc.get("chars", "")))
    from tokenizers import Tokenizer as HFTokenizer

    try:
        if isinstance(doc, dict) and doc.get("pslm_tokenizer") == "bpe-jieba":
            return JiebaBPETokenizer(HFTokenizer.from_str(json.dumps(doc["bpe"])))
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as exc:  # the library raises its own Exception subclasses
        raise ConfigError(f"{path} is not a tokenizer: {exc}") from None
