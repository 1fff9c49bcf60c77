"""A GPT with a classification head, for fine-tuning a pretrained language model on labels.

    model = GPTClassifier(config, num_labels=5)
    model.load_pretrained(params)                  # a pretrained GPT's tensors (the head stays)
    x, lengths = encode_texts(tokenizer, texts, block_size=128)
    logits, loss = model(x, lengths, targets)      # (B, num_labels), mean cross-entropy

The text's representation is the final hidden state at its last token: in a causal model that
is the one position that has seen the whole text. Texts are cut to their first ``block_size``
tokens and padded on the right; padding never changes a text's logits (the last real token
cannot attend to positions after it).

The trunk keeps GPT's parameter names (``transformer.*``), so a pretrained checkpoint loads as
it is; the output head has no use here and is left out (tied, it is the token embedding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pslm.errors import ConfigError
from pslm.lm.model import GPT, GPTConfig
from pslm.lm.tokenizer import Tokenizer


class GPTClassifier(nn.Module):
    def __init__(self, config: GPTConfig, num_labels: int):
        if num_labels < 2:
            raise ConfigError(f"a classifier needs two labels or more, got {num_labels}")
        super().__init__()
        self.config = config
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
        """Logits (B, num_labels) of texts ``idx`` (B, T), each ``lengths`` tokens long, and the
        mean cross-entropy if ``targets`` (B,) are given."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens exceed block_size {self.config.block_size}")
        t = self.transformer
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = t.drop(t.wte(idx) + t.wpe(pos))
        for i, block in enumerate(t.h):
            x = block(x, None, i)
        last = x[torch.arange(B, device=idx.device), lengths.long() - 1]  # (B, C)
        logits = self.score(t.ln_f(last))  # LayerNorm works per position: only where needed
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


def encode_texts(
    tokenizer: Tokenizer, texts: Sequence[str], block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (N, block_size) int32, right-padded with 0, and each text's length (its first
    ``block_size`` tokens; an empty text is one end-of-text token)."""
    x = np.zeros((len(texts), block_size), dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)[:block_size] or [tokenizer.eot_id]
        x[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return x, lengths
