"""Sampling text from a GPT: temperature, top-k, top-p, a seed, and a KV cache.

    ids = generate(model, tok.encode("The "), max_new_tokens=100, temperature=0.8, top_k=50,
                   seed=1)
    text = tok.decode(ids)

With the cache, the prompt is processed once and every new token costs one position. Once the
sequence is longer than the model's context, every step recomputes the last ``block_size``
tokens, exactly as without the cache, so both give the same tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence

import torch

from pslm.errors import ConfigError
from pslm.lm.model import GPT, KVCache


@torch.no_grad()
def stream(
    model: GPT,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one; ``temperature`` 0 is greedy. Stops early at ``stop``."""
    _check(prompt, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))  # global RNG untouched
    block = model.config.block_size
    ids = list(prompt)
    cache: KVCache | None = None
    try:
        for _ in range(max_new_tokens):
            if use_cache and len(ids) <= block:
                if cache is None:  # the prompt, all at once
                    cache = KVCache.for_model(model)
                    logits, _ = model(_tensor(ids, device), cache=cache)
                else:
                    logits, _ = model(_tensor(ids[-1:], device), cache=cache)
            else:
                logits, _ = model(_tensor(ids[-block:], device))
            token = _sample(logits[0, -1], temperature, top_k, top_p, gen)
            ids.append(token)
            yield token
            if token == stop:
                return
    finally:
        model.train(was_training)


def generate(model: GPT, prompt: Sequence[int], **kwargs: object) -> list[int]:
    """The new token ids (see ``stream`` for the arguments)."""
    return list(stream(model, prompt, **kwargs))  # type: ignore[arg-type]


def _tensor(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=device)


def _check(
    prompt: Sequence[int], n: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token")
    if n < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {n}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must lie in (0, 1], got {top_p}")


TINY = torch.finfo(torch.float32).tiny


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator,
) -> int:
    """One token from the logits of one position, (vocab,)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    # shifted so that the largest is 0: a tiny temperature then sends the others to -inf
    # (the greedy limit) instead of overflowing every logit to inf and the softmax to nan;
    # a temperature below float32's range counts as its smallest normal number
    logits = (logits.float() - logits.max()) / max(temperature, TINY)
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # the nucleus
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen))
