"""``pslm bench ps``: a server's update throughput vs ``torch.optim.AdamW(fused=True)``.

Both run in this process on one thread (a server runs one), on the same number of parameters.
pslm runs a shard's whole update for one clock: the mean of the pushed gradients (one push:
used in place; two: summed), optional global-norm clipping, and the fused AdamW step over the
shard's 4 MiB chunks. The baseline does the same work with plain torch on one flat tensor:
``(a + b) / 2`` for two pushes, ``clip_grad_norm_`` for clipping, then
``torch.optim.AdamW(fused=True).step()``; with one push and no clipping it is AdamW alone.
Medians, measured alternately.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.server.shard import ShardStore, clip_coef

SIZES = {"0.8M": 800_000, "26M": 26_214_400}  # the tiny GPT's size; 100 MiB of fp32
CASES = [("1 push", 1, 0.0), ("2 pushes", 2, 0.0), ("1 push + clip", 1, 1.0)]


def run(*, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    reps = 5 if quick else 30
    rows: list[dict[str, Any]] = []
    for label, n in SIZES.items():
        for case, pushes, clip in CASES:
            base, ours = _side_by_side(n, pushes, clip, reps if n < 10**7 else max(3, reps // 3))
            rows.append(
                {
                    "params": label,
                    "case": case,
                    "torch_Mparams_per_s": round(n / base / 1e6, 1),
                    "pslm_Mparams_per_s": round(n / ours / 1e6, 1),
                    "ratio": round(base / ours, 3),
                }
            )
    return {
        "bench": "ps",
        "rows": rows,
        "min_ratio_1_push": min(r["ratio"] for r in rows if r["case"] == "1 push"),
    }


def _side_by_side(n: int, pushes: int, clip: float, reps: int) -> tuple[float, float]:
    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1, clip_norm=clip)
    flat = torch.nn.Parameter(torch.randn(n))
    flat.grad = torch.randn(n)
    torch_opt = torch.optim.AdamW([flat], lr=1e-3, weight_decay=0.1, fused=True)
    pair = [torch.randn(n) for _ in range(2)]

    def torch_step() -> None:
        if pushes == 2:
            torch.add(pair[0], pair[1], out=flat.grad).mul_(0.5)
        if clip:
            torch.nn.utils.clip_grad_norm_([flat], clip)
        torch_opt.step()

    ks = KeySpace.build([("w", (n,))], 1, decay_1d=True)
    store = ShardStore(ks, 0, cfg)
    fresh = [torch.randn(n) for _ in range(pushes)]
    received = [torch.empty(n) for _ in range(pushes)]
    grads = [list(r.split(store.lengths)) for r in received]

    def pslm_step() -> None:
        g, factor = store.reduce([(1.0, p) for p in grads])
        if clip:
            factor *= clip_coef(store.sq_norm(g) * factor**2, clip)
        store.apply(g, factor)

    base, ours = [], []
    for _ in range(reps + 1):
        base.append(_timed(torch_step))
        for r, f in zip(received, fresh, strict=True):  # what a new push would bring
            r.copy_(f)
        ours.append(_timed(pslm_step))
    return statistics.median(base[1:]), statistics.median(ours[1:])


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
