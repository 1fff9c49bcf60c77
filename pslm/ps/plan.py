"""``pslm plan``: a cost model of one training step on a parameter server, to size a cluster.

    job = Job(params=124e6, flops_per_token=8.6e8, tokens_per_step=524288, workers=64)
    hw = Hardware(worker_tflops=100, link_gbps=25)
    p = predict(job, hw, servers=16)          # Prediction: step_s, tokens_per_s, bottleneck
    best, why = recommend(job, hw)            # the number of servers, and the reason

One step of a worker is its computation, then the exchange: its push and pull cross its
own link (``2 x params x bytes per value``), every server's link carries its shard to and from
every worker (``workers / servers`` times that), the server runs the optimizer on its shard,
and each exchange pays the links' latency. pslm overlaps none of the exchange with compute
unless ``overlap`` is on (then the exchange hides behind the backward pass, two thirds of the
compute, as far as it fits). SSP and ASP do not make an exchange cheaper; they stop a slow
worker from holding up the others, which this model (identical workers) does not show.

Calibration (``LOCAL``), from benchmarks on the development machine (BENCHMARKS.md,
2026-11-25): one CPU core trains GPT 4x4x128 at 13,122 tok/s in one PyTorch process (``pslm
bench train``), which at 6 N + 12 L T d FLOPs per token is 0.067 TFLOP/s; a push_pull of 100
MiB through one server moves 3.28 GB/s over loopback (``pslm bench transport``); a server
updates 0.8M AdamW parameters in 0.4 ms (2e9 parameters/s; ``pslm bench ps``); and every
exchange costs 0.5 ms beyond that (the measured 7.25 ms exchange of ``pslm bench train``
less what the terms above explain).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pslm.errors import ConfigError
from pslm.ps.core.consistency import Consistency

CODEC_BYTES = {"none": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0}


def codec_bytes(codec: str) -> float:
    """Bytes per parameter value a codec puts on the wire (top-k: a value and an index per
    kept entry)."""
    if codec.startswith("topk:"):
        try:
            ratio = float(codec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"bad top-k codec {codec!r}") from None
        return 8.0 * ratio
    if codec not in CODEC_BYTES:
        raise ConfigError(f"unknown codec {codec!r}; choose from {', '.join(CODEC_BYTES)}, topk:R")
    return CODEC_BYTES[codec]


@dataclass(frozen=True, slots=True)
class Job:
    params: float
    """Parameters (all of them travel)."""
    flops_per_token: float
    """Training FLOPs per token (forward and backward)."""
    tokens_per_step: int
    """The global batch in tokens."""
    workers: int
    push_codec: str = "none"
    pull_codec: str = "none"
    overlap: bool = False
    consistency: str = "bsp"
    """bsp, ssp:S and asp cost the same here (identical workers: nobody waits for a slower
    one; with stragglers SSP/ASP gain what BSP loses to them); local:H exchanges every H
    steps."""

    def __post_init__(self) -> None:
        if self.params <= 0 or self.flops_per_token <= 0 or self.tokens_per_step <= 0:
            raise ConfigError("params, flops per token and tokens per step must be positive")
        if self.workers < 1:
            raise ConfigError("a job needs at least one worker")
        codec_bytes(self.push_codec)
        codec_bytes(self.pull_codec)
        Consistency.parse(self.consistency)


@dataclass(frozen=True, slots=True)
class Hardware:
    worker_tflops: float
    """Training throughput of one worker, TFLOP/s (what it achieves, not its peak)."""
    link_gbps: float
    """Each worker's and each server's network link, Gbit/s, each direction."""
    latency_s: float = 50e-6
    """One way, per message."""
    update_params_per_s: float = 2e9
    """A server's optimizer pass (fused AdamW on its cores)."""
    overhead_s: float = 0.5e-3
    """Per exchange, beyond the bytes and the update (message handling)."""
    shared_cores: int = 0
    """Workers and servers share this many cores (one machine): with more workers than
    cores, they take turns. 0: each worker has its own hardware."""

    def __post_init__(self) -> None:
        if self.worker_tflops <= 0 or self.link_gbps <= 0 or self.latency_s < 0:
            raise ConfigError("worker TFLOP/s and link Gbit/s must be positive")


LOCAL = Hardware(worker_tflops=0.067, link_gbps=3.28 * 8, latency_s=25e-6, shared_cores=2)
"""This development machine: one core per worker, loopback 'links' (see the module text)."""


@dataclass(frozen=True, slots=True)
class Prediction:
    servers: int
    compute_s: float
    worker_link_s: float
    server_link_s: float
    update_s: float
    latency_s: float
    step_s: float
    tokens_per_s: float
    bottleneck: str
    """compute, worker bandwidth, server bandwidth or server update."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def predict(job: Job, hw: Hardware, servers: int) -> Prediction:
    """The step time and tokens/s of ``job`` on ``hw`` with ``servers`` servers (BSP)."""
    if servers < 1:
        raise ConfigError("a cluster needs at least one server")
    tflops = hw.worker_tflops
    if hw.shared_cores and job.workers > hw.shared_cores:
        tflops *= hw.shared_cores / job.workers  # more workers than cores: they take turns
    compute = job.tokens_per_step / job.workers * job.flops_per_token / (tflops * 1e12)
    per_value = codec_bytes(job.push_codec) + codec_bytes(job.pull_codec)
    link = hw.link_gbps * 1e9 / 8  # bytes/s
    worker_link = job.params * per_value / link
    server_link = job.params / servers * job.workers * per_value / link
    update = job.params / servers / hw.update_params_per_s
    latency = 2 * hw.latency_s + hw.overhead_s
    exchange = worker_link + server_link + update + latency
    mode = Consistency.parse(job.consistency)
    if mode.kind == "local":  # one exchange every H steps
        exchange /= mode.period
    if job.overlap:  # hidden behind the backward pass, as far as it fits
        exchange = max(exchange - 2 / 3 * compute, worker_link + latency)
    step = compute + exchange
    parts = {
        "compute": compute,
        "worker bandwidth": worker_link,
        "server bandwidth": server_link,
        "server update": update,
    }
    return Prediction(
        servers=servers,
        compute_s=compute,
        worker_link_s=worker_link,
        server_link_s=server_link,
        update_s=update,
        latency_s=latency,
        step_s=step,
        tokens_per_s=job.tokens_per_step / step,
        bottleneck=max(parts, key=lambda k: parts[k]),
    )


def recommend(job: Job, hw: Hardware, *, within: float = 0.05) -> tuple[Prediction, str]:
    """The fewest servers (powers of two up to one per worker) whose step is within
    ``within`` of the best, and why: what bounds the step, and what fewer would cost."""
    counts = sorted({2**i for i in range(int(math.log2(job.workers)) + 1)} | {job.workers})
    options = [predict(job, hw, s) for s in counts]
    best = min(p.step_s for p in options)
    pick = next(p for p in options if p.step_s <= best * (1 + within))
    fewer = max((p for p in options if p.servers < pick.servers), default=None, key=_servers)
    why = f"{pick.bottleneck} bounds the step"
    if fewer is not None:
        share = job.workers / fewer.servers
        why += (
            f"; {fewer.servers} servers would take {fewer.step_s / pick.step_s - 1:.0%} longer "
            f"(each server's link carrying {share:g} workers' pushes and pulls)"
        )
    if pick.bottleneck.startswith("server"):
        why += "; faster server links or compression would help"
    return pick, why


def _servers(p: Prediction) -> int:
    return p.servers
