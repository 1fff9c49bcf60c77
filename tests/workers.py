"""Worker functions that integration tests run in real worker processes (``pslm run-worker``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pslm.ps.client.client import PSClient
from pslm.ps.client.exchange import BucketPlan, Exchange
from pslm.ps.core.optim import OptimizerConfig
from tests.models import global_batch, loss_of, make_model


def train(
    client: PSClient,
    *,
    kind: str,
    optimizer: dict[str, Any],
    steps: int,
    batch: int,
    seed: int,
    out: str,
    split_push_pull: bool = False,
    overlap: bool = False,
    rows: bool = False,
    shm: bool = True,
) -> None:
    """BSP training on this worker's slice of each global batch; saves the final parameters.

    ``overlap``: each step's exchange goes in parts (``pslm.ps.client.exchange``), bucket by bucket.
    ``rows``: the token embedding ``tok.weight`` is a row tensor. ``shm``: push_pull through
    shared memory (``PSClient.init``).
    """
    model = make_model(kind, seed + client.rank)  # only worker 0's init may matter
    params = dict(model.named_parameters())
    data = {n: p.data for n, p in params.items()}
    client.init(
        data,
        OptimizerConfig.from_dict(optimizer),
        rows=["tok.weight"] if rows else [],
        shm=shm,
    )
    plan = BucketPlan(client, list(reversed(list(params))), bucket_bytes=4096)
    lo = client.rank * batch // client.num_workers
    hi = (client.rank + 1) * batch // client.num_workers
    losses = []
    for step in range(steps):
        x, y = global_batch(kind, seed, step, batch)
        model.zero_grad()
        loss = loss_of(kind, model, x[lo:hi], y[lo:hi])
        loss.backward()
        grads = {n: p.grad for n, p in params.items()}
        selection = None
        if rows:  # the rows this slice touched, and those the next step's slice reads
            upcoming = global_batch(kind, seed, step + 1, batch)[0][lo:hi]
            selection = {"tok.weight": (x[lo:hi].unique(), upcoming.unique())}
        if overlap:
            ex = Exchange(client, plan, clock=step, out=data, weight=hi - lo, rows=selection)
            for b in range(len(plan) - 1):  # as backward would: the last bucket with finish
                ex.push(b, grads)
            ex.finish(grads, scalars={"loss": loss.item()})
            for b in reversed(range(len(plan))):  # as the next forward would
                ex.wait(b)
            done = ex.complete()
            losses.append(done.scalars["loss"])
        elif split_push_pull:
            client.wait(client.push(grads, clock=step, weight=hi - lo))
            done = client.wait(client.pull(data, version=step + 1))
        else:
            done = client.wait(
                client.push_pull(
                    grads,
                    data,
                    clock=step,
                    weight=hi - lo,
                    scalars={"loss": loss.item()},
                    rows=selection,
                )
            )
            losses.append(done.scalars["loss"])
        assert done.version == step + 1, (done.version, step)
    if rows:  # only the rows of the next batch came back: now every row
        client.wait(client.pull({"tok.weight": data["tok.weight"]}, version=steps))
    total = client.barrier("sum", {"rank": client.rank + 1.0})
    save_file(
        {n: t.contiguous() for n, t in data.items()},
        str(Path(out) / f"params-{client.rank}.safetensors"),
    )
    memory = client.memory
    summary = {
        "losses": losses,
        "sum": total,
        "shared": sorted(memory.active) if memory is not None else [],
        "exchanges": memory.exchanges if memory is not None else 0,
    }
    (Path(out) / f"losses-{client.rank}.json").write_text(json.dumps(summary))


def fail(client: PSClient) -> None:
    raise RuntimeError("this worker fails on purpose")


def idle(client: PSClient, *, steps: int) -> None:
    """Keeps the cluster busy with a tiny model until stopped (for launcher tests)."""
    data = {"w": torch.zeros(4)}
    client.init(data, OptimizerConfig(name="sgd", lr=0.1))
    for step in range(steps):
        client.wait(client.push_pull({"w": torch.ones(4)}, data, clock=step))


def steady(client: PSClient, *, steps: int, numel: int, consistency: str = "bsp") -> None:
    """Every parameter equals minus the number of updates applied: SGD with lr 1 on
    gradients of ones, in small chunks spread over the servers (for readers' tests)."""
    from pslm.ps.core.consistency import Consistency

    data = {"a": torch.zeros(numel), "b": torch.zeros(numel)}
    mode = Consistency.parse(consistency)
    client.init(data, OptimizerConfig(name="sgd", lr=1.0), chunk_bytes=1024, consistency=mode)
    ones = {n: torch.ones_like(t) for n, t in data.items()}
    for step in range(steps):
        client.wait(client.push_pull(ones, data, clock=step))
