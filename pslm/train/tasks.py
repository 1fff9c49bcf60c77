"""What a worker trains: next tokens of a corpus (pre-training) or labels of texts
(fine-tuning). The training loop (``pslm.train.worker``) is the same for both.

    task = make_task(cfg, data, device)       # LMTask or ClassifyTask, by the data
    batch = task.batch(step, lo, hi)          # rows [lo, hi) of the global batch of ``step``
    logits, loss = task.model(*batch)         # batch[0] holds the token ids
    batch = task.val_batch(i)                 # the i-th fixed validation batch

Both draw the global batch of a step from the seed and the step alone, so under BSP results do
not depend on the number of workers. Fine-tuning data is prepared once per run
(``prepare_classify``): the split's texts as windows of the model's context, padded
(``data/{split}_x.npy``, ``_len.npy``), which windows each text owns (``_win.npy``, offsets),
the labels (``_y.npy``), and the texts themselves (``data/{split}.jsonl``). A training step
takes one window of each of its texts, drawn from (seed, step); validation scores windows.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pslm.errors import ConfigError
from pslm.lm.classifier import Encoded, GPTClassifier, encode_texts
from pslm.lm.data import GlobalBatches, PreparedData, get_batch
from pslm.lm.labelled import Labelled, Split
from pslm.lm.model import GPT, GPTConfig
from pslm.lm.tokenizer import Tokenizer
from pslm.train.config import TrainConfig

SPLITS = ("train", "val", "test")


class Task(Protocol):
    model: GPT | GPTClassifier
    model_config: GPTConfig

    def batch(self, step: int, lo: int, hi: int) -> tuple[torch.Tensor, ...]: ...
    def val_batch(self, i: int) -> tuple[torch.Tensor, ...]: ...
    def meta(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ClassifyData:
    """A fine-tuning run's prepared split."""

    path: Path
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in self.meta["labels"]]

    def arrays(self, split: str) -> tuple[Encoded, np.ndarray]:
        """The windows of ``split``'s texts and their label indices (N,)."""
        x, lengths, y = (np.load(self.path / f"{split}_{p}.npy") for p in ("x", "len", "y"))
        win = self.path / f"{split}_win.npy"  # absent in runs from before windows: one each
        offsets = np.load(win) if win.is_file() else np.arange(len(y) + 1, dtype=np.int64)
        enc = Encoded(x, lengths, offsets)
        consistent = (
            offsets.ndim == 1
            and len(offsets) == len(y) + 1
            and len(x) == len(lengths) == offsets[-1]
            and offsets[0] == 0
            and bool((np.diff(offsets) >= 1).all())
        )
        if not consistent:
            raise ConfigError(f"the prepared {split} split in {self.path} is inconsistent")
        return enc, y

    def texts(self, split: str) -> Labelled:
        lines = (self.path / f"{split}.jsonl").read_text().split("\n")
        rows = [json.loads(ln) for ln in lines if ln]
        return Labelled(
            split, [r["text"] for r in rows], [int(r["target"]) for r in rows], self.labels
        )


def prepare_classify(
    path: Path,
    split: Split,
    tokenizer: Tokenizer,
    block_size: int,
    pretrained: Path,
    windows: int = 1,
) -> ClassifyData:
    """Write a split for fine-tuning into ``path``: token arrays and the texts, and a copy of
    the pretrained model (the run must not depend on another run's checkpoints, which go)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pretrained / "model.safetensors", path / "pretrained.safetensors")
    for name in SPLITS:
        part: Labelled = getattr(split, name)
        enc = encode_texts(tokenizer, part.texts, block_size, windows)
        np.save(path / f"{name}_x.npy", enc.x)
        np.save(path / f"{name}_len.npy", enc.lengths)
        np.save(path / f"{name}_win.npy", enc.offsets)
        np.save(path / f"{name}_y.npy", np.asarray(part.targets, dtype=np.int64))
        with open(path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for text, target in zip(part.texts, part.targets, strict=True):
                # ASCII escapes: no U+2028 and the like to split a line on when read back
                f.write(json.dumps({"text": text, "target": target}) + "\n")
    meta = {
        "kind": "classify",
        "vocab_size": tokenizer.vocab_size,
        "labels": split.train.labels,
        "block_size": block_size,
        "windows": windows,
        "sizes": {name: len(getattr(split, name)) for name in SPLITS},
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return ClassifyData(path, meta)


def load_data(path: Path) -> PreparedData | ClassifyData:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no prepared data at {path}: {exc}") from None
    return ClassifyData(path, meta) if meta.get("kind") == "classify" else PreparedData(path, meta)


def make_task(cfg: TrainConfig, data: PreparedData | ClassifyData, device: torch.device) -> Task:
    if isinstance(data, ClassifyData):
        return ClassifyTask(cfg, data, device)
    return LMTask(cfg, data, device)


class LMTask:
    """Pre-training: random windows of the token stream, next-token targets."""

    def __init__(self, cfg: TrainConfig, data: PreparedData, device: torch.device):
        self.device = device
        self.model_config = cfg.model.gpt(data.vocab_size)
        torch.manual_seed(cfg.train.seed)  # every worker builds the same initial model
        self.model: GPT | GPTClassifier = GPT(self.model_config).to(device)
        self.train_tokens = data.tokens("train")
        self.val_tokens = data.tokens("val")
        t, block = cfg.train, self.model_config.block_size
        self.batches = GlobalBatches(
            len(self.train_tokens), block_size=block, batch_size=t.batch_size, seed=t.seed
        )
        self.val_batches = GlobalBatches(
            len(self.val_tokens), block_size=block, batch_size=t.batch_size, seed=t.seed
        )

    def batch(self, step: int, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
        offsets = self.batches.offsets(step)[lo:hi]
        x, y = get_batch(self.train_tokens, offsets, self.model_config.block_size)
        return x.to(self.device), y.to(self.device)

    def val_batch(self, i: int) -> tuple[torch.Tensor, ...]:
        offsets = self.val_batches.offsets(i, stream=1)
        x, y = get_batch(self.val_tokens, offsets, self.model_config.block_size)
        return x.to(self.device), y.to(self.device)

    def meta(self) -> dict[str, Any]:
        return {}


class ClassifyTask:
    """Fine-tuning: labelled texts in an order drawn from (seed, epoch), one window of each
    drawn from (seed, step), a head on a pretrained GPT."""

    def __init__(self, cfg: TrainConfig, data: ClassifyData, device: torch.device):
        self.device = device
        self.labels = data.labels
        self.finetune = cfg.finetune
        self.model_config = cfg.model.gpt(data.vocab_size)
        torch.manual_seed(cfg.train.seed)  # the same new head on every worker
        model = GPTClassifier(self.model_config, len(self.labels), cfg.finetune.pooling)
        pretrained = data.path / "pretrained.safetensors"
        try:
            model.load_pretrained(load_file(str(pretrained)))
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"cannot read the pretrained model {pretrained}: {exc}") from None
        self.model: GPT | GPTClassifier = model.to(device)
        self.train, self.train_y = data.arrays("train")
        self.val, self.val_y = data.arrays("val")
        self.seed = cfg.train.seed
        self.batch_size = cfg.train.batch_size
        if len(self.train) == 0 or len(self.val) == 0:
            raise ConfigError("the training or validation split is empty")
        # validation scores every window, with the label of its text
        self.val_owner = np.repeat(np.arange(len(self.val)), self.val.counts())

    def order(self, step: int) -> np.ndarray:
        """The examples of the global batch of ``step``: epoch after epoch, each a permutation
        drawn from (seed, epoch)."""
        n = len(self.train)
        at = step * self.batch_size + np.arange(self.batch_size)
        epochs = at // n
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([self.seed, 7, int(e)]).permutation(n)
            mask = epochs == e
            out[mask] = perm[at[mask] % n]
        return out

    def windows(self, step: int, texts: np.ndarray) -> np.ndarray:
        """The rows of the global batch of ``step`` (its ``texts``, from ``order``): one
        window of each text, drawn."""
        counts = self.train.counts()[texts]
        draw = np.random.default_rng([self.seed, 11, step]).integers(0, 1 << 30, len(texts))
        return self.train.offsets[texts] + draw % counts

    def batch(self, step: int, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
        texts = self.order(step)
        rows = self.windows(step, texts)[lo:hi]
        return self._take(self.train, rows, self.train_y[texts[lo:hi]])

    def val_batch(self, i: int) -> tuple[torch.Tensor, ...]:
        n = len(self.val_owner)
        rows = (i * self.batch_size + np.arange(self.batch_size)) % n
        return self._take(self.val, rows, self.val_y[self.val_owner[rows]])

    def _take(self, enc: Encoded, rows: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, ...]:
        lengths = torch.from_numpy(enc.lengths[rows].astype(np.int64))
        width = int(lengths.max())  # no longer than the longest window of the batch
        x = torch.from_numpy(enc.x[rows, :width].astype(np.int64))
        y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
        return x.to(self.device), lengths.to(self.device), y_t.to(self.device)

    def meta(self) -> dict[str, Any]:
        return self.finetune.model_meta()
