"""A GPT with a classification head, for fine-tuning a pretrained language model on labels.

    model = GPTClassifier(config, num_labels=5)    # pooling="mean" (default) or "last"
    model.load_pretrained(params)                  # a pretrained GPT's tensors (the head stays)
    enc = encode_texts(tokenizer, texts, block_size=128, windows=8)
    logits, loss = model(x, lengths, targets)      # rows of windows: (B, num_labels), loss
    probs = classify(model, enc)                   # (N, num_labels): a text's windows averaged

A text longer than the context is read in windows: consecutive pieces of ``block_size``
tokens, at most ``windows`` of them (the first ones). The model scores each window; a text's
logits are the mean of its windows' logits. Training takes one window of a text at a time
(the task draws which), so a step costs the same whatever the texts' lengths.

A window's representation pools the final hidden states: their mean over the window's tokens
(``mean``) or the state at its last token (``last``, the one position of a causal model that
has seen the whole window). Windows are padded on the right; padding never changes a window's
logits (no real token attends to positions after it, and pooling skips them).

The trunk keeps GPT's parameter names (``transformer.*``), so a pretrained checkpoint loads as
it is; the output head has no use here and is left out (tied, it is the token embedding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pslm.errors import ConfigError
from pslm.lm.model import GPT, GPTConfig
from pslm.lm.tokenizer import Tokenizer

POOLINGS = ("mean", "last")


class GPTClassifier(nn.Module):
    def __init__(self, config: GPTConfig, num_labels: int, pooling: str = "mean"):
        if num_labels < 2:
            raise ConfigError(f"a classifier needs two labels or more, got {num_labels}")
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        super().__init__()
        self.config = config
        self.pooling = pooling
        self.transformer = GPT(config).transformer  # GPT-2's initialisation; no output head
        self.score = nn.Linear(config.n_embd, num_labels)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score.bias)
        self.num_labels = num_labels

    def forward(
        self,
        idx: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, num_labels) of windows ``idx`` (B, T), each ``lengths`` tokens long, and
        the mean cross-entropy if ``targets`` (B,) are given."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens exceed block_size {self.config.block_size}")
        t = self.transformer
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = t.drop(t.wte(idx) + t.wpe(pos))
        for i, block in enumerate(t.h):
            x = block(x, None, i)
        lengths = lengths.long()
        if self.pooling == "last":
            pooled = t.ln_f(x[torch.arange(B, device=idx.device), lengths - 1])
        else:
            real = (pos[None, :] < lengths[:, None]).to(x.dtype)  # (B, T)
            pooled = (t.ln_f(x) * real[..., None]).sum(dim=1) / lengths[:, None].to(x.dtype)
        logits = self.score(pooled)
        loss = None if targets is None else F.cross_entropy(logits, targets.long())
        return logits, loss

    def load_pretrained(self, params: Mapping[str, torch.Tensor]) -> None:
        """Take a pretrained GPT's tensors for the trunk; ConfigError unless every trunk
        tensor is there with its shape."""
        own = {n: p for n, p in self.named_parameters() if not n.startswith("score.")}
        missing = sorted(set(own) - set(params))
        if missing:
            raise ConfigError(f"the pretrained model lacks {missing[:3]}: another architecture")
        with torch.no_grad():
            for name, p in own.items():
                if tuple(params[name].shape) != tuple(p.shape):
                    raise ConfigError(
                        f"pretrained {name} has shape {list(params[name].shape)}, the model "
                        f"{list(p.shape)}"
                    )
                p.copy_(params[name])


@dataclass(frozen=True, slots=True)
class Encoded:
    """Texts as windows: rows ``x`` (M, T) int32 right-padded with 0, ``lengths`` (M,), and
    ``offsets`` (N + 1,): text i owns rows ``offsets[i]:offsets[i + 1]`` (one at least)."""

    x: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_texts(
    tokenizer: Tokenizer, texts: Sequence[str], block_size: int, windows: int = 1
) -> Encoded:
    """Each text's first ``windows`` windows of ``block_size`` tokens (an empty text is one
    end-of-text token)."""
    if windows < 1:
        raise ConfigError(f"windows must be >= 1, got {windows}")
    rows: list[list[int]] = []
    offsets = [0]
    for text in texts:
        ids = tokenizer.encode(text)[: block_size * windows] or [tokenizer.eot_id]
        rows += [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
        offsets.append(len(rows))
    x = np.zeros((len(rows), block_size), dtype=np.int32)
    lengths = np.zeros(len(rows), dtype=np.int32)
    for i, ids in enumerate(rows):
        x[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return Encoded(x, lengths, np.asarray(offsets, dtype=np.int64))


@torch.no_grad()
def classify(model: GPTClassifier, enc: Encoded, batch: int = 64) -> torch.Tensor:
    """Label probabilities (N, num_labels) of encoded texts: softmax of the mean of each
    text's window logits."""
    device = next(model.parameters()).device
    parts = []
    for lo in range(0, len(enc.x), batch):
        ls = torch.from_numpy(enc.lengths[lo : lo + batch].astype(np.int64))
        xs = torch.from_numpy(enc.x[lo : lo + batch, : int(ls.max())].astype(np.int64))
        logits, _ = model(xs.to(device), ls.to(device))
        parts.append(logits.float().cpu())
    rows = torch.cat(parts) if parts else torch.zeros(0, model.num_labels)
    owner = torch.repeat_interleave(torch.from_numpy(enc.counts()))
    sums = torch.zeros(len(enc), model.num_labels).index_add_(0, owner, rows)
    return torch.softmax(sums / torch.from_numpy(enc.counts())[:, None].float(), dim=-1)
