"""A decoder-only GPT language model, single-device, read top-down.

    model = GPT(GPTConfig.preset("small", vocab_size=4096))
    logits, loss = model(idx, targets)          # idx, targets: (B, T) int64
    cache = KVCache.for_model(model, batch=1)
    logits, _ = model(prompt, cache=cache)      # then one token at a time with the same cache

Token and position embeddings, pre-LayerNorm transformer blocks with causal self-attention
(``scaled_dot_product_attention``) and a GELU MLP, a final LayerNorm, and an output head that
shares its weight with the token embedding (unless ``tie_embeddings`` is off); GPT-2
initialisation. Nothing here knows about
parameter servers or processes: the training loop adapts between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from pslm.errors import ConfigError

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
}
"""``tiny`` for tests, ``small`` the default (trains in minutes on a laptop CPU), ``gpt2`` the
124M-parameter GPT-2 shape (with a 50257-token vocabulary)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class GPTConfig:
    """The shape of a GPT."""

    vocab_size: int
    """Tokens in the vocabulary (the tokenizer's size)."""
    block_size: int = 128
    """Longest context, in tokens."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability in training (0 keeps runs reproducible across worker counts)."""
    bias: bool = True
    """Biases in linear layers and LayerNorms."""
    tie_embeddings: bool = True
    """The output head shares its weight with the token embedding (GPT-2); untied, the
    embedding is only read row by row, one row per input token."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}")

    @classmethod
    def preset(cls, name: str, **overrides: int | float | bool) -> GPTConfig:
        """A named preset (``PRESETS``) with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})  # type: ignore[arg-type]

    def with_(self, **changes: int | float | bool) -> GPTConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


class KVCache:
    """Keys and values of earlier positions, per layer, for generation one token at a time."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        length: int,
        head_size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch, n_head, length, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0
        """Positions stored so far."""

    @classmethod
    def for_model(cls, model: GPT, batch: int = 1) -> KVCache:
        c = model.config
        p = next(model.parameters())
        return cls(
            c.n_layer,
            batch,
            c.n_head,
            c.block_size,
            c.n_embd // c.n_head,
            device=p.device,
            dtype=p.dtype,
        )

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, nh, T, hs) after the cached positions; return all keys and values."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape  # batch, sequence length, width
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.length
            # a prompt fills an empty cache; after that tokens come one at a time, so a causal
            # mask is needed only when there is no past (T > 1 with a past is not supported)
            assert past == 0 or T == 1, "extend a non-empty KV cache one token at a time"
            k, v = cache.extend(layer, k, v)  # (B, nh, past + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=past == 0 and T > 1
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The trunk: embeddings, blocks, final LayerNorm (named as in GPT-2 checkpoints)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying (one parameter)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameters counted once (the tied head is the token embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.transformer.wpe.weight.numel()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits, and the mean cross-entropy if ``targets`` are given.

        Without targets only the last position's logits are computed, (B, 1, vocab): that is
        all generation needs.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(pos))  # (B, T, C)
        for i, block in enumerate(t.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        x = t.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, vocab)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def training_cost(config: GPTConfig) -> tuple[float, float]:
    """A GPT's parameter count and its training FLOPs per token: 6 N + 12 L T d (the
    estimate of the PaLM paper and nanoGPT), without building its tensors."""
    with torch.device("meta"):
        n = GPT(config).num_params()
    attention = 12 * config.n_layer * config.block_size * config.n_embd
    return float(n), float(6 * n + attention)
