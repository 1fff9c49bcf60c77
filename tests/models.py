"""Small models and deterministic global batches shared by test workers and references."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ = 50, 8


class TinyTransformer(nn.Module):
    """One pre-norm causal transformer block over token + position embeddings.

    The key projection has no bias: softmax ignores it, so its true gradient is zero, and Adam
    would turn the rounding noise of that zero into full-size steps that differ with the
    summation order. Any two correct trainers would disagree there; the test is for the rest.
    """

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(SEQ, width)
        self.ln1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T))
        h = self.ln1(x)
        q, k, v = (
            f(h).view(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln_f(x))


def make_model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
        )
    return TinyTransformer()


def global_batch(kind: str, seed: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 10_007 + step)
    if kind == "mlp":
        x = torch.randn(size, 16, generator=g)
        return x, (x[:, :4] * 3).sin()
    idx = torch.randint(0, VOCAB, (size, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def loss_of(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if kind == "mlp":
        return nn.functional.mse_loss(out, y)
    return nn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
