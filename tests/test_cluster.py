"""Real scheduler, server and worker processes on 127.0.0.1, talking ZeroMQ."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pslm.errors import ConfigError, RefusedError, RequestTimeout
from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.core.optim import OptimizerConfig, ScheduleConfig
from pslm.ps.launch.local import LocalCluster
from tests.conftest import launch_config
from tests.models import global_batch, loss_of, make_model

STEPS, BATCH, SEED = 20, 8, 3

ADAMW = OptimizerConfig(
    name="adamw",
    lr=3e-3,
    betas=(0.9, 0.99),
    weight_decay=0.1,
    clip_norm=0.5,
    schedule=ScheduleConfig(kind="cosine", warmup_steps=5, decay_steps=STEPS, min_lr=3e-4),
)
SGD = OptimizerConfig(
    name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, clip_norm=0.5
)
ADAM = OptimizerConfig(name="adam", lr=3e-3, weight_decay=1e-3, clip_norm=0.5)


def reference(
    kind: str, cfg: OptimizerConfig, *, rows: bool = False
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, plain torch.optim + clip_grad_norm_, on the same global batches: the final
    parameters and the loss of every step. ``rows``: the token embedding takes SparseAdam
    with the rows of the batch's tokens."""
    model = make_model(kind, SEED)
    emb = model.tok.weight if rows else None
    dense = [p for p in model.parameters() if p is not emb]
    decay = [p for p in dense if p.dim() >= 2]
    rest = [p for p in dense if p.dim() < 2]
    sparse = torch.optim.SparseAdam([emb], lr=cfg.lr, betas=cfg.betas) if emb is not None else None
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
        )
    elif cfg.name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    losses = []
    for step in range(STEPS):
        x, y = global_batch(kind, SEED, step, BATCH)
        model.zero_grad()  # the sparse optimizer's parameter too
        loss = loss_of(kind, model, x, y)
        loss.backward()
        losses.append(loss.item())
        if cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        opt.step()
        if sparse is not None and emb is not None and emb.grad is not None:
            touched = x.unique()
            emb.grad = torch.sparse_coo_tensor(
                touched[None], emb.grad[touched], emb.shape, check_invariants=True
            )
            sparse.param_groups[0]["lr"] = cfg.lr_at(step)
            sparse.step()
    return {n: p.detach() for n, p in model.named_parameters()}, losses


@pytest.mark.parametrize(
    "kind, cfg, how",
    [
        ("mlp", ADAMW, ""),
        ("mlp", SGD, "split"),
        ("mlp", ADAM, ""),
        ("transformer", ADAMW, ""),
        ("transformer", ADAMW, "socket"),
        ("transformer", ADAMW, "overlap"),
        ("transformer", ADAMW, "rows"),
        ("transformer", ADAM, "rows+overlap"),
    ],
    ids=[
        "mlp-adamw-clip",
        "mlp-sgd-nesterov-clip-push-then-pull",
        "mlp-adam-clip",
        "transformer-adamw-clip",
        "transformer-adamw-clip-socket",
        "transformer-adamw-clip-in-parts",
        "transformer-adamw-clip-sparse-rows",
        "transformer-adam-clip-sparse-rows-in-parts",
    ],
)
def test_bsp_two_workers_two_servers_match_plain_pytorch(tmp_path, kind, cfg, how) -> None:
    split = how == "split"
    rows = "rows" in how
    args = {
        "kind": kind,
        "optimizer": cfg.to_dict(),
        "steps": STEPS,
        "batch": BATCH,
        "seed": SEED,
        "out": str(tmp_path),
        "split_push_pull": split,
        "overlap": "overlap" in how,
        "rows": rows,
        "shm": how != "socket",
    }
    lc = launch_config(
        tmp_path, num_servers=2, num_workers=2, worker="tests.workers:train", worker_args=args
    )
    with LocalCluster(lc) as cluster:
        cluster.wait(timeout=120)
    want, want_losses = reference(kind, cfg, rows=rows)
    got = [load_file(str(tmp_path / f"params-{r}.safetensors")) for r in range(2)]
    logs = [json.loads((tmp_path / f"losses-{r}.json").read_text()) for r in range(2)]
    assert logs[0]["sum"] == logs[1]["sum"] == {"rank": 3.0}  # barrier values: 1 + 2
    # servers and workers share this machine: shared memory unless told not to
    assert logs[0]["shared"] == logs[1]["shared"] == ([] if how == "socket" else [0, 1])
    through_memory = 2 * STEPS if how in ("", "rows") else 0  # push_pull only
    assert logs[0]["exchanges"] == logs[1]["exchanges"] == through_memory
    if not split:  # push_pull returned the global batch's loss, the weighted mean of slices
        assert logs[0]["losses"] == logs[1]["losses"]
        assert logs[0]["losses"] == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
    assert set(got[0]) == set(want)
    for name, expected in want.items():
        assert torch.equal(got[0][name], got[1][name]), name
        torch.testing.assert_close(got[0][name], expected, rtol=1e-5, atol=1e-7, msg=name)
    start = dict(make_model(kind, SEED).named_parameters())
    assert any(not torch.equal(start[n].detach(), want[n]) for n in want)  # it did train


@pytest.fixture
def one_worker_cluster(tmp_path):
    """Scheduler + 2 servers; this test process is the only worker."""
    lc = launch_config(
        tmp_path,
        num_servers=2,
        num_workers=1,
        worker=None,
        timeout=5.0,
        heartbeat_interval=0.2,
        heartbeat_timeout=2.0,
    )
    with LocalCluster(lc) as cluster:
        yield cluster


def _client(cluster: LocalCluster, timeout: float = 10.0) -> PSClient:
    return PSClient(ClientConfig(scheduler=cluster.scheduler_address, timeout=timeout))


def test_100_mib_tensor_round_trips_exactly(one_worker_cluster) -> None:
    big = torch.randn(25 << 20)  # 100 MiB of fp32 -> 25 chunks of 4 MiB over 2 servers
    client = _client(one_worker_cluster, timeout=60.0)
    client.init({"big": big, "small": torch.ones(3)}, OptimizerConfig(name="sgd", lr=1.0))
    assert client.keyspace is not None and len(client.keyspace.chunks) == 26
    loads = client.keyspace.loads()
    assert abs(loads[0] - loads[1]) <= 4 << 20
    out = {"big": torch.zeros_like(big), "small": torch.zeros(3)}
    assert client.wait(client.pull(out)).version == 0
    assert torch.equal(out["big"], big) and torch.equal(out["small"], torch.ones(3))
    grad = torch.full_like(big, 0.5)
    client.wait(client.push_pull({"big": grad, "small": torch.zeros(3)}, out, clock=0))
    assert torch.equal(out["big"], big - 0.5)
    client.close()
    one_worker_cluster.wait(timeout=30)


def test_single_huge_chunk_crosses_in_frames_of_at_most_16_mib(one_worker_cluster) -> None:
    big = torch.randn(25 << 20)
    client = _client(one_worker_cluster, timeout=60.0)
    client.init({"big": big}, OptimizerConfig(name="sgd", lr=1.0), chunk_bytes=100 << 20)
    out = {"big": torch.zeros_like(big)}
    client.wait(client.pull(out))
    assert torch.equal(out["big"], big)
    client.close()


def test_bad_push_is_refused_and_changes_nothing(one_worker_cluster) -> None:
    client = _client(one_worker_cluster)
    w = torch.randn(8, 8)
    client.init({"w": w, "b": torch.zeros(8)}, OptimizerConfig(name="sgd", lr=1.0))
    # bypass the client's own checks: a raw push with a wrong shape and one with a wrong dtype
    from pslm.wire.message import Message

    for s in range(2):
        n = len(client.keyspace.pieces(s))
        for bad in ([torch.zeros(3)] * n, [torch.zeros(64, dtype=torch.int64)] * n):
            msg = Message("push", body={"worker": 0, "clock": 0}, tensors=bad)
            with pytest.raises(RefusedError, match="expected a float tensor of shape"):
                client.channel.request(f"server-{s}", msg)
    with pytest.raises(RefusedError, match="clock 5"):
        client.wait(client.push({"w": torch.ones(8, 8), "b": torch.ones(8)}, clock=5))
    out = {"w": torch.zeros(8, 8), "b": torch.ones(8)}
    assert client.wait(client.pull(out)).version == 0
    assert torch.equal(out["w"], w) and torch.equal(out["b"], torch.zeros(8))
    client.close()


def test_shared_memory_is_refused_when_it_does_not_hold_up_and_changes_nothing(
    one_worker_cluster,
) -> None:
    from pslm.wire.message import Message
    from pslm.wire.shm import Segment

    client = _client(one_worker_cluster)
    w, b = torch.randn(8, 8), torch.zeros(8)
    client.init({"w": w, "b": b}, OptimizerConfig(name="sgd", lr=1.0), shm=False)
    assert client.memory is None
    assert client.layout is not None
    held = {s: sum(x.length for x in client.layout.slots[s]) for s in range(2)}
    # a push marked shm from a worker that never attached
    for s in range(2):
        body = {"worker": 0, "clock": 0, "shm": "pslm-w0-0", "reply_params": True}
        msg = Message("push", body=body)
        with pytest.raises(RefusedError, match="no shared memory on this server"):
            client.channel.request(f"server-{s}", msg)
    # segments whose regions do not fit or overlap, or that are not what they say
    size = 2 * max(held.values())
    seg = Segment.create(size, tag="w0")
    try:
        for s, n in held.items():
            bad = [
                ({"segment": seg.describe(), "grad": 0, "inbox": size - n + 1}, "do not fit"),
                ({"segment": seg.describe(), "grad": 0, "inbox": n - 1}, "overlap"),
                (
                    {"segment": {**seg.describe(), "fd": 0}, "grad": 0, "inbox": n},
                    "not the segment",
                ),
            ]
            for body, why in bad:
                with pytest.raises(RefusedError, match=why) as refused:
                    client.channel.request(
                        f"server-{s}", Message("attach", body={"worker": 0, **body})
                    )
                assert refused.value.code == "no_shm"
    finally:
        seg.close()
    # nothing changed, and the socket path still trains
    out = {"w": torch.zeros(8, 8), "b": torch.ones(8)}
    grads = {"w": torch.ones(8, 8), "b": torch.ones(8)}
    assert client.wait(client.push_pull(grads, out, clock=0)).version == 1
    assert torch.equal(out["w"], w - 1) and torch.equal(out["b"], b - 1)
    client.close()


def test_push_pull_through_shared_memory_equals_the_socket(one_worker_cluster) -> None:
    client = _client(one_worker_cluster)
    tensors = {"w": torch.randn(300, 100), "b": torch.randn(100)}
    client.init(
        {k: v.clone() for k, v in tensors.items()},
        OptimizerConfig(name="adamw", lr=0.1, clip_norm=1.0),
        chunk_bytes=40_000,  # several chunks, on both servers
    )
    assert client.memory is not None and client.memory.active == {0, 1}
    socket_out = {k: torch.zeros_like(v) for k, v in tensors.items()}
    shm_out = {k: torch.zeros_like(v) for k, v in tensors.items()}
    for step in range(4):
        grads = {k: torch.randn_like(v) for k, v in tensors.items()}
        memory = client.memory
        client.memory = memory if step % 2 else None  # odd steps through memory, even ones not
        done = client.wait(client.push_pull(grads, shm_out, clock=step))
        client.memory = memory
        assert done.version == step + 1
        assert done.bytes_sent == done.bytes_received == 4 * 30_100  # the same values moved
        client.wait(client.pull(socket_out))  # a pull always takes the socket
        for k in tensors:
            assert torch.equal(shm_out[k], socket_out[k]), (step, k)
    assert memory.exchanges == 2 * 2  # two steps, two servers
    from pslm.wire.message import Message

    body = {"worker": 0, "clock": 4, "shm": "pslm-w0-another", "reply_params": True}
    with pytest.raises(RefusedError, match="no shared memory"):  # not the segment it attached
        client.channel.request("server-0", Message("push", body=body))
    client.close()


def test_a_planned_push_pull_follows_the_tensors_it_is_given(one_worker_cluster) -> None:
    """push_pull between the same two mappings reuses a plan of where each piece goes; any
    change to the mappings (another tensor, new storage in place, a wrong shape) is seen."""
    client = _client(one_worker_cluster)
    shapes = {"w": (20, 20), "v": (30,), "b": (30,), "u": (10, 40), "x": (300,), "t": (700,)}
    client.init(
        {k: torch.zeros(s) for k, s in shapes.items()},
        OptimizerConfig(name="sgd", lr=1.0),
        chunk_bytes=2_000,  # pieces of several small tensors on both servers; t in two chunks
        shm=False,
    )
    grads, out = client.allocate(), client.allocate()  # the layout plans are made for
    truth = {k: torch.zeros(s) for k, s in shapes.items()}  # what the servers hold

    def step(clock: int, grads: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        assert client.wait(client.push_pull(grads, out, clock=clock)).version == clock + 1
        for k in truth:
            truth[k] -= grads[k]
            assert torch.equal(out[k], truth[k]), (clock, k)

    for g in grads.values():
        g.copy_(torch.randn_like(g))
    step(0, grads, out)
    plan = client.planner.plan
    assert plan is not None and len(plan.pushes) == 2
    grads["v"].mul_(3)  # new values in the same memory: sent as they are
    step(1, grads, out)
    assert client.planner.plan is plan
    old, before = out, {k: v.clone() for k, v in out.items()}
    out = client.allocate()  # other tensors: filled, the old ones left alone
    step(2, grads, out)
    assert all(torch.equal(old[k], before[k]) for k in old)
    assert client.planner.plan is not None and client.planner.plan is not plan
    fresh = client.allocate()
    for k in out:  # new storage under the same tensor objects
        out[k].data = fresh[k]
    step(3, grads, out)
    fresh = client.allocate()
    for k in grads:  # likewise for the gradients, with new values
        grads[k].data = fresh[k].copy_(torch.randn_like(grads[k]))
    step(4, grads, out)
    assert client.planner.plan is not None
    out["b"] = torch.zeros(30)  # a tensor outside the layout: no plan, the general path
    step(5, grads, out)
    assert client.planner.plan is None
    with pytest.raises(ConfigError, match="shape"):
        client.push_pull({**grads, "v": torch.ones(31)}, out, clock=6)
    with pytest.raises(ConfigError, match="missing"):
        client.push_pull(grads, {k: out[k] for k in ("w", "v", "b")}, clock=6)
    step(6, grads, out)  # nothing was pushed by the refused calls
    client.close()


def test_a_large_planned_push_pull_travels_in_parts(one_worker_cluster, monkeypatch) -> None:
    """Over PART_BYTES of dense chunks to one server, a planned push_pull sends its pieces in
    parts; each part's reply comes as soon as its chunks are updated and fills its spans of
    ``out``. The result is the whole update, and the same clock pushed again is taken once."""
    import pslm.ps.client.layout

    monkeypatch.setattr(pslm.ps.client.layout, "PART_BYTES", 1_000)  # parts of about 1 kB
    client = _client(one_worker_cluster)
    shapes = {"w": (20, 20), "v": (30,), "b": (30,), "u": (10, 40), "x": (300,), "t": (700,)}
    client.init(
        {k: torch.zeros(s) for k, s in shapes.items()},
        OptimizerConfig(name="sgd", lr=1.0, momentum=0.5),
        chunk_bytes=1_000,
        shm=False,
    )
    grads, out = client.allocate(), client.allocate()
    truth = {k: torch.zeros(s) for k, s in shapes.items()}
    momentum = {k: torch.zeros(s) for k, s in shapes.items()}
    for clock in range(3):
        for k, g in grads.items():
            g.copy_(torch.randn_like(g))
            momentum[k] = g.clone() if clock == 0 else momentum[k] * 0.5 + g
            truth[k] -= momentum[k]
        done = client.wait(client.push_pull(grads, out, clock=clock))
        assert done.version == clock + 1
        assert done.bytes_sent == done.bytes_received == 4 * sum(t.numel() for t in truth.values())
        for k in truth:
            torch.testing.assert_close(out[k], truth[k], rtol=1e-6, atol=1e-6)
        again = {k: v.clone() for k, v in out.items()}
        for v in out.values():
            v.zero_()
        assert client.wait(client.push_pull(grads, out, clock=clock)).version == clock + 1
        assert all(torch.equal(out[k], again[k]) for k in out)  # answered, not applied twice
    plan = client.planner.plan
    assert plan is not None and all(len(m) >= 3 for m in plan.messages)  # parts on both servers
    client.close()


def test_pull_from_a_killed_server_raises_the_named_timeout(one_worker_cluster) -> None:
    client = _client(one_worker_cluster, timeout=1.5)
    client.init(
        {"w": torch.randn(64, 64), "v": torch.randn(64, 64)},
        OptimizerConfig(name="sgd", lr=1.0),
        chunk_bytes=4096,
    )
    server1 = next(c for c in one_worker_cluster.children if c.name == "server-1")
    os.kill(server1.proc.pid, signal.SIGKILL)
    server1.proc.wait()
    out = {"w": torch.zeros(64, 64), "v": torch.zeros(64, 64)}
    start = time.monotonic()
    with pytest.raises(RequestTimeout, match="server-1"):
        client.wait(client.pull(out))
    assert 1.5 <= time.monotonic() - start < 5.0
    client.close(finalize=False)


def test_servers_save_their_shards_at_a_version(one_worker_cluster, tmp_path) -> None:
    client = _client(one_worker_cluster)
    w = torch.randn(300, 300)
    client.init({"w": w, "b": torch.zeros(5)}, OptimizerConfig(name="adamw", lr=0.1))
    out = {"w": w.clone(), "b": torch.zeros(5)}
    version = client.wait(
        client.push_pull({"w": torch.ones(300, 300), "b": torch.ones(5)}, out, clock=0)
    ).version
    ckpt = one_worker_cluster.run_dir / "ckpt"  # (servers save inside the run directory)
    ckpt.mkdir()
    with pytest.raises(RefusedError, match="version 0"):
        client.save(str(ckpt), version=0)
    files = client.save(str(ckpt), version=version)
    assert sorted(Path(f).name for f in files) == [
        "shard-000-of-002.safetensors",
        "shard-001-of-002.safetensors",
    ]
    ks = client.keyspace
    assert ks is not None
    for server, f in enumerate(sorted(files)):
        with safe_open(f, "pt") as shard:
            meta = shard.metadata()
            assert meta["version"] == "1" and json.loads(meta["optimizer"])["name"] == "adamw"
            assert {"state.exp_avg", "state.exp_avg_sq", "steps"} <= set(shard.keys())
            params = shard.get_tensor("params")
        expected = [
            out[ks.tensors[c.tensor].name].reshape(-1)[c.offset : c.offset + c.length]
            for c in ks.shard(server)
        ]
        assert torch.equal(params, torch.cat(expected))
    with pytest.raises(RefusedError, match="not a directory"):
        client.save(str(one_worker_cluster.run_dir / "nowhere"), version=version)
    client.close()


def test_compressed_pushes_and_pulls(one_worker_cluster) -> None:
    client = _client(one_worker_cluster)
    w = torch.randn(64, 64)
    client.init({"w": w}, OptimizerConfig(name="sgd", lr=1.0), push_codec="int8", pull_codec="bf16")
    grad = torch.randn(64, 64)
    out = {"w": torch.zeros(64, 64)}
    done = client.wait(client.push_pull({"w": grad}, out, clock=0))
    assert done.bytes_sent == 64 * 64 + 8 and done.bytes_received == 64 * 64 * 2
    span = float(grad.max() - grad.min())
    expected = w - grad  # up to int8's step on the way in and bf16 rounding on the way out
    assert float((out["w"] - expected).abs().max()) <= span / 510 + 0.01 * float(w.abs().max())
    assert torch.equal(out["w"], out["w"].bfloat16().float())  # came as bf16
    # the residual int8 dropped (per chunk: its scale is per chunk) is kept for the next push
    assert client.feedback.residual and client.feedback.residual["0/k0"].abs().max() > 0
    with pytest.raises(RefusedError, match="pulls take"):
        msg_body = {"worker": 0, "min_version": 0, "pull_codec": "int8"}
        from pslm.wire.message import Message

        client.channel.request("server-0", Message("pull", body=msg_body))
    client.close()


def test_push_parts_are_checked_and_a_refused_part_changes_nothing(one_worker_cluster) -> None:
    from pslm.wire.message import Message

    client = _client(one_worker_cluster)
    w = torch.randn(8, 8)
    client.init({"w": w, "b": torch.zeros(8)}, OptimizerConfig(name="sgd", lr=1.0))
    ks = client.keyspace
    server = {ks.tensors[c.tensor].name: c.server for c in ks.chunks}
    assert server["w"] != server["b"]  # largest first, least loaded: one each

    seqs = iter(range(100))

    def part(name: str, keys: list[int], tensors: list[torch.Tensor], final: bool) -> None:
        head = client.push_header(0, 1.0, reply_params=False)
        body = replace(head, keys=keys, final=final, seq=next(seqs)).to_body()  # each a new part
        client.channel.request(
            f"server-{server[name]}", Message("push", body=body, tensors=tensors)
        )

    key = {ks.tensors[c.tensor].name: c.key for c in ks.chunks}
    with pytest.raises(RefusedError, match="not a dense chunk of this server"):
        part("w", [key["b"]], [torch.ones(8)], final=False)
    with pytest.raises(RefusedError, match="push has 0 tensors"):
        part("w", [key["w"]], [], final=False)
    part("w", [key["w"]], [torch.ones(64)], final=False)
    with pytest.raises(RefusedError, match="repeats chunks"):
        part("w", [key["w"]], [torch.ones(64)], final=True)
    with pytest.raises(RefusedError, match="leaves 1 chunks missing"):
        part("b", [], [], final=True)
    part("w", [], [], final=True)  # the end of the push on w's server: applied
    part("b", [key["b"]], [torch.full((8,), 2.0)], final=True)
    out = {"w": torch.zeros(8, 8), "b": torch.ones(8)}
    assert client.wait(client.pull(out, version=1)).version == 1
    assert torch.equal(out["w"], w - 1.0) and torch.equal(out["b"], torch.full((8,), -2.0))
    client.close()


def test_a_run_of_consecutive_chunks_travels_as_one_tensor(one_worker_cluster) -> None:
    from pslm.wire.message import Message

    client = _client(one_worker_cluster)
    start = {n: torch.full((4, 4), float(i)) for i, n in enumerate("abcd")}
    client.init(start, OptimizerConfig(name="sgd", lr=1.0))
    ks = client.keyspace
    held = {s: [ks.tensors[c.tensor].name for c in ks.shard(s)] for s in range(2)}
    assert held == {0: ["a", "c"], 1: ["b", "d"]}  # largest first, least loaded, lower key

    def part(server: int, keys: list[int], runs: list[int], tensors: list[torch.Tensor]):
        head = client.push_header(0, 1.0, reply_params=True)
        body = replace(head, keys=keys, runs=runs, final=True).to_body()
        msg = Message("push", body=body, tensors=tensors)
        return client.channel.request(f"server-{server}", msg)

    with pytest.raises(RefusedError, match="consecutive"):
        part(0, [2, 0], [2], [torch.ones(32)])  # c, a: not in shard order
    with pytest.raises(RefusedError, match="adding up"):
        part(0, [0, 2], [1], [torch.ones(16)])
    reply = part(0, [0, 2], [2], [torch.ones(32)])  # a and c in one tensor, back in one
    assert [t.shape for t in reply.tensors] == [torch.Size([32])]
    assert torch.equal(reply.tensors[0], torch.cat([start["a"] - 1, start["c"] - 1]).view(-1))
    client.close()


def test_pushes_sent_twice_are_applied_once(one_worker_cluster) -> None:
    """A client may send a push again (after a timeout): the server answers it as it answered
    the first time and does not apply it twice; parts likewise."""
    from pslm.ps.client.exchange import BucketPlan, Exchange
    from pslm.wire.message import Message

    client = _client(one_worker_cluster)
    w = torch.randn(8, 8)
    client.init({"w": w, "b": torch.zeros(8)}, OptimizerConfig(name="sgd", lr=1.0))
    grads = {"w": torch.ones(8, 8), "b": torch.ones(8)}
    out = {"w": torch.zeros(8, 8), "b": torch.zeros(8)}
    client.wait(client.push_pull(grads, out, clock=0, scalars={"loss": 2.0}))
    sent: list[Message] = []
    original = client.channel.send

    def record(name: str, msg: Message) -> int:
        sent.append(msg)
        return original(name, msg)

    client.channel.send = record  # type: ignore[method-assign]
    done = client.wait(client.push_pull(grads, out, clock=1, scalars={"loss": 1.0}))
    client.channel.send = original  # type: ignore[method-assign]
    assert done.version == 2 and torch.equal(out["w"], w - 1 - 1)  # SGD, lr 1, gradient 1
    for s, msg in enumerate(sent):  # the same messages again: the values they asked for
        again = client.channel.request(
            f"server-{s}", Message("push", body=msg.body, tensors=msg.tensors)
        )
        assert again.body["version"] == 2 and len(again.tensors) == len(msg.tensors)
        assert again.body["scalars"] == {"loss": 1.0} or s != 0
    first = Message("push", body={**sent[0].body, "clock": 0}, tensors=sent[0].tensors)
    with pytest.raises(RefusedError, match="applied long ago"):
        client.channel.request("server-0", first)
    acked = client.channel.request(
        "server-0",
        Message("push", body={**first.body, "reply_params": False}, tensors=first.tensors),
    )
    assert acked.body["duplicate"] and acked.body["version"] == 2
    # a part sent twice within a clock
    plan = BucketPlan(client, ["b", "w"], bucket_bytes=1)
    ex = Exchange(client, plan, clock=2, out=out)
    sent.clear()
    client.channel.send = record  # type: ignore[method-assign]
    ex.push(0, grads)
    client.channel.send = original  # type: ignore[method-assign]
    (part,) = sent
    server = 0 if part.body["keys"] == [c.key for c in client.keyspace.shard(0)] else 1
    client.channel.send(f"server-{server}", Message("push", body=part.body, tensors=part.tensors))
    ex.finish(grads)
    assert ex.complete().version == 3
    client.wait(client.pull(out, version=3))
    assert torch.equal(out["w"], w - 1 - 1 - 1) and torch.equal(out["b"], torch.full((8,), -3.0))
    client.close()
