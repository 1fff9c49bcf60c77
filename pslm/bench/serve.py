"""``pslm bench serve``: generation over HTTP, and what a serving process costs training.

Generation: for the ``tiny`` and ``small`` presets (random weights: speed does not depend on
them), a run directory with a checkpoint is made and ``pslm serve`` started on 127.0.0.1, with
the KV cache and without it (``--no-kv-cache``), in turn. Greedy requests (a 20-token prompt,
64 new tokens) come from 1 client, then from 8 concurrent clients; each setting gets the same
number of requests. With 8 clients, the requests take turns token by token (``--parallel 1``,
the default) or run side by side (``--parallel 8``). Reported: generated tokens per second
(all clients together) and the p50 and p99 latency of a whole request.

Health under load: 64 clients asking for generations back to back from the ``tiny`` run for
20 s (half of them streaming), while one more asks ``/healthz`` every 50 ms. Goal: its p99
under 1 s.

Training: ``pslm bench train``'s pslm contender (GPT 4x4x128, 2 workers, 1 server) alone, and
with a ``pslm serve --follow --refresh 1`` process reading its parameters every second, in
turn, ``rounds`` times; medians; the first 200 steps of both are not timed (the serving
process starts meanwhile). Goal: at most 5% fewer tokens/s.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROMPT_TOKENS, NEW_TOKENS = 20, 64
SERVE_WARMUP = 200
"""Steps not timed, in both settings: the serving process starts (imports torch, reads the
parameters a first time) meanwhile; then it only refreshes."""


def run(*, quick: bool = False) -> dict[str, Any]:
    requests = 4 if quick else 16
    rows = []
    with tempfile.TemporaryDirectory(prefix="pslm-bench-serve-") as tmp:
        for preset in ("tiny", "small"):
            run_dir = _run_dir(Path(tmp) / preset, preset)
            for cache in (True, False):
                for clients, parallel in ((1, 1), (8, 1), (8, 8)):
                    rows.append(_generation(run_dir, preset, cache, clients, requests, parallel))
        load = _health_under_load(Path(tmp) / "tiny", 64, 5.0 if quick else 20.0)
        cost = _training_cost(Path(tmp), quick)
    return {"bench": "serve", "rows": rows, "health_under_load": load, **cost}


def _run_dir(path: Path, preset: str) -> Path:
    """A run directory with a checkpoint of a randomly initialised model."""
    import torch

    from pslm.lm.checkpoint import step_dir, write_model, write_run_model
    from pslm.lm.model import GPT, GPTConfig
    from pslm.lm.tokenizer import CharTokenizer

    chars = [chr(33 + i) for i in range(90)]
    tokenizer = CharTokenizer(chars)
    path.mkdir(parents=True)
    tokenizer.save(path / "tokenizer.json")
    config = GPTConfig.preset(preset, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(config)
    write_run_model(path, config, {})
    ckpt = step_dir(path, 1)
    ckpt.mkdir(parents=True)
    write_model(ckpt, model, {"step": 1, "version": 1})
    return path


def _generation(
    run_dir: Path, preset: str, cache: bool, clients: int, n: int, parallel: int = 1
) -> dict[str, Any]:
    import httpx

    proc, url = _start(run_dir, "--parallel", str(parallel), *([] if cache else ["--no-kv-cache"]))
    try:
        prompt = "".join(chr(33 + (7 * i) % 90) for i in range(PROMPT_TOKENS))
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}

        def one(_: int) -> tuple[float, int]:
            with httpx.Client(base_url=url, timeout=300) as http:
                t0 = time.perf_counter()
                r = http.post("/v1/generate", json=body)
                r.raise_for_status()
                return time.perf_counter() - t0, int(r.json()["tokens"])

        one(0)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            got = list(pool.map(one, range(n)))
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies = sorted(t for t, _ in got)
    return {
        "preset": preset,
        "kv_cache": cache,
        "clients": clients,
        "parallel": parallel,
        "requests": n,
        "tokens_per_s": round(sum(k for _, k in got) / wall, 1),
        "p50_s": round(statistics.median(latencies), 4),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
    }


def _start(run_dir: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``pslm serve --run run_dir ARGS`` on a free port of 127.0.0.1: the process and URL."""
    addr = run_dir / "serve.addr"
    addr.unlink(missing_ok=True)
    argv = ["serve", "--run", str(run_dir), "--port", "0", "--address-file", str(addr), *args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pslm", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not addr.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("pslm serve did not start")
        time.sleep(0.05)
    return proc, addr.read_text()


def _health_under_load(run_dir: Path, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads asking for streamed generations back to back for ``seconds``
    (those beyond ``--max-inflight`` get 503 at once and ask again), while one more client
    asks ``/healthz`` every 50 ms: its latencies."""
    import httpx

    proc, url = _start(run_dir)
    stop = time.monotonic() + seconds
    body = {"prompt": "The", "max_tokens": NEW_TOKENS, "temperature": 1.0}

    def load(i: int) -> tuple[int, int]:
        done = busy = 0
        with httpx.Client(base_url=url, timeout=300) as http:
            while time.monotonic() < stop:
                # half the clients stream: a stream holds a worker thread only per piece,
                # a plain request for the whole generation
                with http.stream("POST", "/v1/generate", json={**body, "stream": i % 2 == 1}) as r:
                    for _line in r.iter_lines():
                        pass
                    done, busy = done + (r.status_code == 200), busy + (r.status_code == 503)
                if r.status_code == 503:  # as a client told to retry after 1 s would
                    time.sleep(float(r.headers.get("retry-after", 1)))
        return done, busy

    health: list[float] = []
    try:
        with ThreadPoolExecutor(clients) as pool, httpx.Client(base_url=url, timeout=60) as http:
            loads = [pool.submit(load, i) for i in range(clients)]
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                http.get("/healthz").raise_for_status()
                health.append(time.perf_counter() - t0)
                time.sleep(0.05)
            counts = [f.result() for f in loads]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    health.sort()
    return {
        "clients": clients,
        "seconds": seconds,
        "generations": sum(d for d, _ in counts),
        "refused_503": sum(b for _, b in counts),
        "healthz_polls": len(health),
        "healthz_p50_s": round(statistics.median(health), 4),
        "healthz_p99_s": round(health[min(len(health) - 1, int(0.99 * len(health)))], 4),
        "healthz_max_s": round(health[-1], 4),
    }


def _training_cost(tmp: Path, quick: bool) -> dict[str, Any]:
    from pslm.bench import train as bt

    steps = 30 if quick else 200
    rounds = 1 if quick else 3
    got: dict[str, list[float]] = {"alone": [], "served": []}
    data = bt._synthetic_data(tmp / "data")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for r in range(rounds):
        for name in got:
            tps, _ = bt._pslm(
                data,
                steps,
                tmp / f"{name}{r}",
                serve_refresh=1.0 if name == "served" else 0,
                warmup=SERVE_WARMUP,  # the serving process is up and reading by then
            )
            got[name].append(tps)
    alone, served = (statistics.median(got[k]) for k in ("alone", "served"))
    return {
        "train_alone_tokens_per_s": round(alone),
        "train_served_tokens_per_s": round(served),
        "serving_cost": round(1 - served / alone, 3),
        "serving_cost_met": 1 - served / alone <= 0.05,
        "train_rounds": {k: [round(v) for v in vs] for k, vs in got.items()},
        "train_steps": steps,
        "generation_request": json.dumps(
            {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "greedy": True}
        ),
    }
