"""The server at its edges: requests parked for a later version, a share's push begun by a
worker that died, pushes acknowledged under SSP with a backup, a waiting read that fails, an
update that fails part-way, and clipping a NaN norm.

Real processes on 127.0.0.1 where a cluster can reach the state; where it cannot (each such
test says why), a registered Server in this process, handed requests as its loop hands them,
its replies recorded and its backup and scheduler stood in for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from pslm.errors import RefusedError, RequestTimeout, ShardFailed
from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.control.node import Membership
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.launch.local import LocalCluster
from pslm.ps.server.asynchronous import WaitingRead
from pslm.ps.server.loop import Role, Server, ServerConfig
from pslm.ps.server.replica import Update, update_message
from pslm.ps.server.replies import Selection
from pslm.ps.server.shard import ShardStore, StagedUpdate, clip_coef
from pslm.wire.message import Message
from pslm.wire.transport import Channel, Listener
from tests.conftest import launch_config

SGD = OptimizerConfig(name="sgd", lr=1.0)
START = {"a": torch.arange(16.0).view(4, 4), "b": torch.arange(4.0)}


@contextmanager
def _cluster(tmp_path: Path, workers: int) -> Iterator[list[PSClient]]:
    """A scheduler and one server; this process is every worker (a client each), the
    parameters ``START`` initialised with SGD at learning rate 1 under BSP."""
    lc = launch_config(
        tmp_path,
        num_servers=1,
        num_workers=workers,
        worker=None,
        heartbeat_interval=0.2,
        heartbeat_timeout=2.0,
    )

    def join(rank: int) -> PSClient:  # registration and init wait for every worker
        cfg = ClientConfig(scheduler=cluster.scheduler_address, rank=rank, timeout=10.0)
        client = PSClient(cfg)
        client.init({k: v.clone() for k, v in START.items()}, SGD, shm=False)
        return client

    with LocalCluster(lc) as cluster, ThreadPoolExecutor(workers) as pool:
        clients = list(pool.map(join, range(workers)))
        try:
            yield clients
        finally:
            for client in clients:
                client.close(finalize=False)


def _zeros() -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in START.items()}


def _read(client: PSClient, **body: Any) -> int:
    """Send a reader's ``read`` of every chunk of server 0 (as ``pslm.ps.client.reader`` does)."""
    assert client.keyspace is not None
    keys = [c.key for c in client.keyspace.shard(0)]
    return client.channel.send("server-0", Message("read", body={"keys": keys, **body}))


def test_a_read_with_a_bad_pull_codec_is_refused_before_it_is_parked(tmp_path) -> None:
    """A read for the next version asking for a codec pulls do not take is refused at once;
    a pull parked after it and the push that brings the version are answered as usual."""
    with _cluster(tmp_path, 1) as (client,):
        read = _read(client, min_version=1, pull_codec="int8")
        with pytest.raises(RefusedError, match="pulls take") as refused:
            client.channel.wait([read], timeout=5.0)
        assert refused.value.code == "bad_codec"
        later = _zeros()
        pull = client.pull(later, version=1)
        grads = {k: torch.ones_like(v) for k, v in START.items()}
        assert client.wait(client.push_pull(grads, _zeros(), clock=0)).version == 1
        assert client.wait(pull, timeout=5.0).version == 1
        for k, v in START.items():
            assert torch.equal(later[k], v - 1), k


def test_a_read_parked_ahead_is_answered_when_the_model_turns_asynchronous(tmp_path) -> None:
    """A read for a version three ahead waits under BSP; a fence switches to SSP at clock 1,
    where reads wait for no version: it is answered then, as an asynchronous read."""
    with _cluster(tmp_path, 1) as (client,):
        read = _read(client, min_version=3)
        client.fence(1, Consistency.parse("ssp:1"))
        grads = {k: torch.ones_like(v) for k, v in START.items()}
        assert client.wait(client.push_pull(grads, _zeros(), clock=0)).version == 1
        assert client.consistency == Consistency.parse("ssp:1")
        reply = client.channel.wait([read], timeout=5.0)[read]
        assert reply.body["version"] == 1 and reply.body["synchronous"] is False
        assert client.keyspace is not None
        for chunk, t in zip(client.keyspace.shard(0), reply.tensors, strict=True):
            name = client.keyspace.tensors[chunk.tensor].name
            assert torch.equal(t, (START[name] - 1).view(-1)), name


def test_a_dead_workers_part_is_not_taken_for_the_new_holders_push(tmp_path) -> None:
    """Worker 0 sends the first part (seq 0, not final) of share 0's push for clock 0 and
    sends nothing more, as a worker killed midway; worker 1, which holds share 0 now, pushes
    it whole (seq 0 as well). That push is the share's, not a repeat of the dead one's part:
    the clock is applied with worker 1's gradients alone, and the part's reply is refused."""
    with _cluster(tmp_path, 2) as (dead, heir):
        assert dead.keyspace is not None
        key = {dead.keyspace.tensors[c.tensor].name: c.key for c in dead.keyspace.chunks}
        head = dead.push_header(0, 1.0, reply_params=True)
        body = replace(head, keys=[key["a"]], final=False, seq=0).to_body()
        part = dead.channel.send(
            "server-0", Message("push", body=body, tensors=[torch.full((16,), 100.0)])
        )
        dead.wait(dead.pull(_zeros()))  # answered in order: the server has the part now
        share0 = {k: torch.full_like(v, 2.0) for k, v in START.items()}
        share1 = {k: torch.full_like(v, 4.0) for k, v in START.items()}
        taken = heir.push(share0, clock=0, share=0)
        out = _zeros()
        done = heir.wait(heir.push_pull(share1, out, clock=0), timeout=10.0)
        assert done.version == 1 and done.trained_by == (1, 1)
        heir.wait(taken)
        for k, v in START.items():
            assert torch.equal(out[k], v - 3.0), k  # the mean of 2 and 4, at lr 1
        with pytest.raises(RefusedError, match="worker 1's now") as refused:
            dead.channel.wait([part], timeout=5.0)
        assert refused.value.code == "superseded"


# --- a Server object in-process, with fake sockets -------------------------------------------


class _Outbox:
    """Stands in for the server's socket on the way out: records every reply (peer, message)."""

    def __init__(self, events: list[tuple[Any, ...]]):
        self.events = events

    def send(self, peer: bytes, msg: Message, *, track: bool = False) -> None:
        self.events.append(("reply", peer, msg))


class _Backup:
    """Stands in for the link to the shard's backup: confirms updates, or fails them."""

    def __init__(self, events: list[tuple[Any, ...]], *, fail: bool = False):
        self.events, self.fail = events, fail

    def request(self, msg: Message) -> Message:
        self.events.append(("backup", msg.op))
        if self.fail:
            raise RequestTimeout("the backup did not answer")
        return msg.reply()

    def close(self) -> None:
        pass


class _Scheduler:
    """Stands in for the scheduler: a backup report is answered with ``serving``."""

    def __init__(self, serving: bool):
        self.serving = serving

    def request(self, name: str, msg: Message) -> Message:
        return msg.reply(serving=self.serving)

    def close(self) -> None:
        pass


Make = Callable[..., tuple[Server, list[tuple[Any, ...]]]]


@pytest.fixture
def make_server() -> Iterator[Make]:
    """A factory of registered, initialised servers of shard 0 (one server, two workers) whose
    replies go to a list of events; ``consistency`` as in an ``init`` message. Their sockets
    are bound on 127.0.0.1 but nothing connects to them: requests are handed to
    ``Server.handle``, as its loop does."""
    sockets: list[Listener | Channel] = []

    def make(consistency: Consistency | None = None) -> tuple[Server, list[tuple[Any, ...]]]:
        listener = Listener("tcp://127.0.0.1:*")
        scheduler = Channel(timeout=1.0)
        sockets.extend([listener, scheduler])
        events: list[tuple[Any, ...]] = []
        me = Membership("server-0", 0, 2, 1, (listener.address,), 1.0, 5.0, shard=0)
        cfg = ServerConfig(scheduler="tcp://127.0.0.1:1")
        server = Server(cfg, me, listener, scheduler, listener.address, outbox=_Outbox(events))
        ks = KeySpace.build([("a", (4, 4)), ("b", (4,))], 1)
        body = {
            "worker": 0,
            "keyspace": ks.to_dict(),
            "optimizer": SGD.to_dict(),
            "consistency": (consistency or Consistency()).to_dict(),
        }
        server.handle(b"w0", Message("init", id=1, body=body, tensors=_pieces(ks, START)))
        assert _replies(events) == {1: ["ok"]}
        events.clear()
        return server, events

    yield make
    for socket in sockets:
        socket.close()


def _push(worker: int, rid: int, tensors: list[torch.Tensor], **body: Any) -> Message:
    body = {"worker": worker, "clock": 0, "reply_params": False, **body}
    return Message("push", id=rid, body=body, tensors=tensors)


def _pieces(ks: KeySpace, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as server 0 takes a whole shard: one tensor per piece."""
    chunks = ks.shard(0)
    return [
        torch.cat([tensors[ks.tensors[c.tensor].name].reshape(-1) for c in chunks[lo:hi]])
        for lo, hi in ks.pieces(0)
    ]


def _ones(server: Server) -> list[torch.Tensor]:
    """A whole-shard gradient of ones, one tensor per piece (as a plain push carries it)."""
    store = server.service.state.store
    return [torch.ones_like(t) for t in store.packed[: len(store.keyspace.pieces(0))]]


def _replies(events: list[tuple[Any, ...]]) -> dict[int, list[str]]:
    """Request id -> the ops of the replies it got."""
    out: dict[int, list[str]] = {}
    for event in events:
        if event[0] == "reply":
            out.setdefault(event[2].id, []).append(event[2].op)
    return out


def test_a_parked_request_that_fails_is_refused_alone(make_server) -> None:
    """In-process: a parked read that fails when its version comes (a bad codec, refused on
    arrival now, so a real cluster cannot park one) is refused alone; the pull parked after
    it is answered, and the pushes that brought the version get their one reply each."""
    server, events = make_server()
    bad = Message("read", id=5, body={"keys": [0], "min_version": 1, "pull_codec": "int8"})
    store = server.service.state.store
    server.service.parked.append((b"reader", bad, 1, Selection.of_pull(store, [0])))
    server.handle(b"w1", Message("pull", id=6, body={"worker": 1, "min_version": 1}))
    for w in (0, 1):
        server.handle(b"w%d" % w, _push(w, 10 + w, _ones(server), reply_params=True))
    replies = _replies(events)
    assert replies == {10: ["ok"], 11: ["ok"], 6: ["ok"], 5: ["error"]}
    refusal = next(e[2] for e in events if e[2].id == 5)
    assert refusal.body["code"] == "bad_codec" and server.service.parked == []


def test_under_ssp_a_waiting_read_that_fails_is_refused_alone(make_server) -> None:
    """In-process, as the test above for BSP's parked requests: a read waiting for the
    staleness gate that fails when let through (a bad codec, refused on arrival, so a real
    cluster cannot queue one) is refused alone; the push that opened the gate is answered
    with its parameters. The failure used to drop every read queued after it and refuse the
    push, although it was applied."""
    server, events = make_server(Consistency.parse("ssp:1"))
    bad = Message("read", id=5, body={"pull_codec": "int8"})
    store = server.service.state.store
    server.service.reads.wait(WaitingRead(b"reader", bad, 0, Selection.of_pull(store, [0])))
    server.handle(b"w0", _push(0, 10, _ones(server), reply_params=True))
    assert _replies(events) == {5: ["error"], 10: ["ok"]} and store.version == 1
    assert server.service.reads.waiting == []


def test_under_ssp_a_push_is_acknowledged_once_on_the_backup(make_server) -> None:
    """In-process (a fake backup and scheduler): a real cluster cannot stop the primary
    between answering a push and sending it to the backup. Under SSP a push that asks for no
    parameters - every part of it - is acknowledged only after the backup confirmed it;
    when the backup fails and the shard is served elsewhere now, it is not acknowledged at
    all (the worker sends it to the new server), and not applied."""
    server, events = make_server(Consistency.parse("ssp:1"))
    server.replication.link = _Backup(events)
    state = server.service.state
    a, b = (c.key for c in state.store.chunks)
    server.handle(b"w0", _push(0, 10, [torch.ones(16)], keys=[a], final=False, seq=0))
    assert events == []  # a part: not applied yet
    server.handle(b"w0", _push(0, 11, [torch.ones(4)], keys=[b], final=True, seq=1))
    assert [(e[0], e[2].id if e[0] == "reply" else e[1]) for e in events] == [
        ("backup", "update"),
        ("reply", 10),
        ("reply", 11),
    ]
    assert _replies(events) == {10: ["ok"], 11: ["ok"]} and state.store.version == 1
    events.clear()
    server.replication.link = _Backup(events, fail=True)
    server.replication.scheduler = _Scheduler(serving=False)
    server.handle(b"w1", _push(1, 12, _ones(server)))
    assert events == [("backup", "update")]  # and no reply
    assert state.store.version == 1 and state.gate.clocks == [1, 0]
    assert not server.replication.serving  # the loop leaves with protocol.DEMOTED


def test_an_update_that_fails_part_way_takes_the_server_down(make_server, monkeypatch) -> None:
    """In-process: no input reaches a failing kernel (each push is checked on arrival), so a
    stand-in fails the second span of a staged update (worker 1's reply, after worker 0's
    went out with chunk a stepped; chunk b is not): the request loop lets ShardFailed through
    (the server leaves and its backup, which has the whole clock, serves the shard) instead
    of answering on from a shard that is half one version and half the next. A backup whose
    copy of the same update fails leaves the same way (and is dropped)."""
    server, events = make_server()
    spans: list[tuple[int, int]] = []
    stepped = StagedUpdate.span

    def span(self: StagedUpdate, lo: int, hi: int) -> None:
        spans.append((lo, hi))
        if len(spans) == 2:
            raise RuntimeError("a kernel failed")
        stepped(self, lo, hi)

    monkeypatch.setattr(StagedUpdate, "span", span)
    store = server.service.state.store
    a, b = (c.key for c in store.chunks)

    def part(w: int, seq: int) -> tuple[bytes, Message]:  # (chunk a, then chunk b)
        grad, key = (torch.ones(16), a) if seq == 0 else (torch.ones(4), b)
        body = {"keys": [key], "seq": seq, "final": seq == 1, "priority": seq}
        return b"w%d" % w, _push(w, 10 * (seq + 1) + w, [grad], reply_params=True, **body)

    for w in (0, 1):
        server.handle(*part(w, 0))
    server.handle(*part(0, 1))  # worker 0's last part: the clock waits for worker 1's
    with pytest.raises(ShardFailed, match="failed part-way"):
        server.handle(*part(1, 1))
    assert _replies(events) == {10: ["ok"]}  # (worker 0's first part, then the failure)
    assert store.version == 0

    backup, _ = make_server()
    backup.role = Role.BACKUP
    grads: list[Any] = [torch.ones(16), torch.ones(4)]
    update = update_message(Update(kind="bsp", version=0, multiplier=1.0, grads=grads, step=0))

    def fail(self: Update, store: ShardStore) -> None:
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(Update, "apply", fail)
    with pytest.raises(ShardFailed, match="backup of shard 0"):
        backup.handle(b"primary", update)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_clipping_a_nan_norm_makes_the_step_nan_as_torch_does(name: str) -> None:
    """A NaN in the gradient makes the global norm NaN; ``clip_grad_norm_`` then multiplies
    every gradient by NaN (not by 1: unclipped), and so does the store's step."""
    cfg = OptimizerConfig(name=name, lr=0.1, clip_norm=1.0)
    ks = KeySpace.build([("a", (4, 4)), ("b", (4,))], 1)
    store = ShardStore(ks, 0, cfg)
    store.load(_pieces(ks, START))
    grads = {"a": torch.ones(4, 4), "b": torch.ones(4)}
    grads["a"][1, 2] = math.nan
    reduced, factor = store.reduce([(1.0, store.unpack(_pieces(ks, grads), "push"))])
    coef = clip_coef(store.sq_norm(reduced) * factor**2, cfg.clip_norm)
    assert math.isnan(coef)
    store.apply(reduced, factor * coef)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in START.items()}
    for k, p in ref.items():
        p.grad = grads[k].clone()
    torch.nn.utils.clip_grad_norm_(list(ref.values()), cfg.clip_norm)
    assert all(p.grad is not None and p.grad.isnan().all() for p in ref.values())
    opt = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    opt(list(ref.values()), lr=0.1, weight_decay=0.0).step()
    want = torch.cat(_pieces(ks, {k: p.detach() for k, p in ref.items()}))
    torch.testing.assert_close(store.params, want, equal_nan=True)
    assert store.params.isnan().all()


def _rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_reader_that_never_reads_is_refused_and_pins_no_copy_per_step(tmp_path) -> None:
    """A reader asks for the whole shard every step and never reads its socket: the server
    copies the parameters once (its unsent replies keep the old memory), then refuses it until
    it reads, so its memory does not grow by a copy per step, and training goes on exactly."""
    import zmq

    from pslm.wire import auth
    from pslm.wire.message import encode

    lc = launch_config(tmp_path, num_servers=1, num_workers=1, worker=None)
    with LocalCluster(lc) as cluster:
        client = PSClient(ClientConfig(scheduler=cluster.scheduler_address, timeout=30.0))
        w = torch.randn(1024, 4096)  # 16 MiB
        client.init({"w": w}, OptimizerConfig(name="sgd", lr=0.5))
        server = next(c for c in cluster.children if c.role == "server")
        keys = [c.key for c in client.layout.keyspace.shard(0)]  # type: ignore[union-attr]
        stalled = zmq.Context.instance().socket(zmq.DEALER)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        security = auth.current()
        assert security is not None
        security.as_role("reader").present(stalled)
        stalled.connect(client.me.servers[0])
        grads, out = {"w": torch.full((1024, 4096), 0.5)}, {"w": torch.zeros(1024, 4096)}
        expected = w.clone()
        before = 0
        for step in range(16):
            body = {"keys": keys, "min_version": step}
            stalled.send_multipart(encode(Message("read", id=step + 1, body=body)))
            client.wait(client.push_pull(grads, out, clock=step))
            expected -= 0.5 * grads["w"]
            if step == 3:  # the copy made, the first replies queued
                before = _rss(server.proc.pid)
        growth = _rss(server.proc.pid) - before
        assert torch.allclose(out["w"], expected)
        assert growth < 3 * w.nbytes, f"grew by {growth / 2**20:.0f} MiB in 12 steps"
        stalled.close()
        client.close()
        cluster.wait(timeout=30)
    log = (cluster.run_dir / "logs" / "server-0.log").read_text()
    assert log.count("did not read their replies") == 1
