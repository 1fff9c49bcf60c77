"""pslm plan: the cost model against throughput this machine measured, and its shape."""

from __future__ import annotations

import json

import pytest

from pslm.errors import ConfigError
from pslm.lm.model import GPTConfig, training_cost
from pslm.ps.plan import LOCAL, Hardware, Job, predict, recommend
from tests.test_cli import pslm

# Measured here (BENCHMARKS.md, 2026-11-25): GPT 4x4x128, block 64, 65 tokens, 12 sequences
# per worker, 2 workers, BSP; tokens/s medians of three rounds.
RECORDED = [
    ("pslm bench train (pslm)", 1, 23_097),
    ("pslm bench train, earlier run", 1, 21_065),
    ("pslm bench recovery (no backups)", 2, 23_311),
    ("pslm bench serve (training alone)", 1, 22_145),
]
BENCH_MODEL = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)


@pytest.mark.parametrize("what, servers, measured", RECORDED)
def test_local_predictions_are_within_25_percent(what: str, servers: int, measured: int) -> None:
    params, flops = training_cost(BENCH_MODEL)
    job = Job(params=params, flops_per_token=flops, tokens_per_step=24 * 64, workers=2)
    predicted = predict(job, LOCAL, servers).tokens_per_s
    assert abs(predicted / measured - 1) <= 0.25, (what, predicted, measured)


def test_the_model_behaves() -> None:
    job = Job(params=124e6, flops_per_token=8.6e8, tokens_per_step=524_288, workers=64)
    hw = Hardware(worker_tflops=100, link_gbps=25)
    steps = [predict(job, hw, s).step_s for s in (1, 2, 4, 8, 16, 32, 64)]
    assert steps == sorted(steps, reverse=True)  # more servers never hurt
    assert predict(job, hw, 1).bottleneck == "server bandwidth"
    assert predict(job, hw, 64).bottleneck == "worker bandwidth"
    bf16 = Job(params=124e6, flops_per_token=8.6e8, tokens_per_step=524_288, workers=64,
               push_codec="bf16", pull_codec="bf16")  # fmt: skip
    plain = predict(job, hw, 64).worker_link_s
    assert predict(bf16, hw, 64).worker_link_s == pytest.approx(plain / 2)
    local4 = Job(params=124e6, flops_per_token=8.6e8, tokens_per_step=524_288, workers=64,
                 consistency="local:4")  # fmt: skip
    exchange = predict(job, hw, 64).step_s - predict(job, hw, 64).compute_s
    assert predict(local4, hw, 64).step_s == pytest.approx(
        predict(job, hw, 64).compute_s + exchange / 4
    )
    pick, why = recommend(job, hw)
    assert pick.servers == 64 and "32 servers would take" in why
    slow_gpus = Hardware(worker_tflops=1, link_gbps=100)
    pick, _ = recommend(job, slow_gpus)
    assert pick.bottleneck == "compute" and pick.servers < 64  # compute-bound: few servers do
    with pytest.raises(ConfigError):
        Job(params=1, flops_per_token=1, tokens_per_step=1, workers=1, push_codec="zip")


def test_plan_command() -> None:
    res = pslm("plan", "--model", "gpt2", "--workers", "64", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["servers"] == 64 and out["bottleneck"] == "worker bandwidth"
    assert out["model"].startswith("gpt2: 124.")
    bad = pslm("plan", "--workers", "0")
    assert bad.returncode == 1 and "at least one worker" in bad.stderr
