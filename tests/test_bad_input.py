"""Random and malformed messages sent straight to a live server's and scheduler's sockets."""

from __future__ import annotations

import logging
import math
import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pslm.errors import ProtocolError, RefusedError
from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.core import protocol
from pslm.ps.core.consistency import Consistency
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.launch.local import LocalCluster
from pslm.wire import auth
from pslm.wire.message import Message, decode, encode
from pslm.wire.peerlog import PeerLog
from pslm.wire.transport import Channel
from tests.conftest import launch_config

values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile = st.one_of(  # well typed, but out of range
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 3.5e38, 1e-320, -0.0]),
    st.sampled_from([-1, -(2**63), 2**62, 2**63 - 1, 2**40, 1 << 31, 0, 1]),
    st.lists(st.integers(-2, 5), max_size=6),  # keys and shares, duplicates included
    st.sampled_from(["bsp", "async", "skip", "async-skip", "local", "../..", "/", "", "x" * 80]),
)
typed_bodies = st.dictionaries(
    st.sampled_from(
        [
            "worker", "share", "clock", "weight", "version", "min_version", "keys", "runs",
            "row_keys", "seq", "server", "sq", "sq_norm", "multiplier", "kind", "step", "by",
            "scalars", "path", "restore", "rank", "node", "group", "skipped", "clocks",
        ]
    ),
    hostile | st.dictionaries(st.sampled_from(["loss", "min.finite", "min.ctl"]), hostile),
    max_size=8,
)  # fmt: skip
bodies = st.dictionaries(
    st.sampled_from(
        [
            "worker",
            "clock",
            "weight",
            "reply_params",
            "min_version",
            "keys",
            "server",
            "sq",
            "keyspace",
            "optimizer",
            "node",
            "role",
            "rank",
            "name",
            "group",
            "address",
            "segment",
            "grad",
            "inbox",
            "shm",
        ]
    ),
    values,
    max_size=6,
)
descs = st.lists(
    st.tuples(
        st.sampled_from(["f32", "f16", "bf16", "i64", "u8", "f64"]),
        st.lists(st.integers(-1, 40), max_size=3),
    ),
    max_size=3,
)


@st.composite
def messages(draw: st.DrawFn, ops: list[str]) -> list[bytes]:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # pure garbage
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    header = {
        "v": 1,
        "op": draw(st.sampled_from(ops)),
        "id": draw(st.integers(0, 2**63 - 1)),
        "body": draw(bodies | typed_bodies),
        "t": [[d, s] for d, s in draw(descs)],
    }
    if kind == 1:
        header[draw(st.sampled_from(["v", "id", "op", "body", "t"]))] = draw(values)
    frames = [msgpack.packb(header)]
    for _ in draw(descs) if kind == 2 else []:
        frames.append(bytes(draw(st.integers(0, 200))))
    if kind == 3:  # well-formed frames for the descriptors, when the sizes are sane
        for _, shape in header["t"]:
            n = 1
            for d in shape:
                n *= max(d, 0)
            frames.append(bytes(4 * n if n < 10_000 else 8))
    return frames


def _probe(bad: zmq.Socket, good: zmq.Socket, frames: list[bytes], check: Message) -> None:
    """Send ``frames`` from ``bad``, then a valid request from ``good``, which must be
    answered (by its own reply or a refusal: the peer is alive and serving); every refusal
    ``bad`` gets says why."""
    bad.send_multipart(frames)
    good.send_multipart(encode(check))
    assert good.poll(10_000), "no answer to a valid request after a malformed one"
    assert decode(good.recv_multipart()).id == check.id
    while bad.poll(0):
        reply = decode(bad.recv_multipart())
        if reply.op == "error":
            assert isinstance(reply.body.get("message"), str) and reply.body["message"]


def _socket(address: str, role: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security = auth.current()
    assert security is not None  # the launcher made up a secret and installed it here
    security.as_role(role).present(sock)  # an insider gone mad: outsiders do not get this far
    sock.connect(address)
    return sock


def _fuzz(address: str, ops: list[str], check: Message, role: str, examples: int) -> None:
    bad, good = _socket(address, role), _socket(address, "worker")

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages(ops))
    def fuzz(frames: list[bytes]) -> None:
        _probe(bad, good, frames, check)

    try:
        fuzz()
    finally:
        bad.close()
        good.close()


SERVER_OPS = [op for op, roles in protocol.ALLOWED.items() if {"worker", "server"} & roles]
SCHEDULER_OPS = ["register", "heartbeat", "leave", "barrier", "declare", "finalize", "leases"]
SCHEDULER_OPS += ["release", "steering", "backup", "status", "keyspace", "ctl", "shutdown"]


def test_server_and_scheduler_survive_random_messages(tmp_path) -> None:
    """Every op of the servers (the backup's too) and of the scheduler, from authenticated
    peers of every cluster role, with malformed and well-typed hostile values: each peer
    stays up and answers, refusals say why, and the job's values are untouched."""
    lc = launch_config(tmp_path, num_servers=1, num_workers=1, worker=None, replicas=1)
    with LocalCluster(lc) as cluster:
        client = PSClient(ClientConfig(scheduler=cluster.scheduler_address, timeout=10.0))
        w = torch.randn(4, 4)
        client.init({"w": w}, OptimizerConfig(name="sgd", lr=0.1))
        pull = Message("pull", id=2**62, body={"worker": 0, "min_version": 0})
        attach = Message("attach", id=2**62, body={"worker": 0, "segment": "x"})  # refused
        sched, ops = cluster.scheduler_address, [*SERVER_OPS, "nope"]
        targets = [
            (client.me.servers[0], ops, pull, "worker", 500),
            (client.me.servers[0], ops, pull, "server", 300),
            (client.me.backups[0], ops, attach, "server", 300),  # a backup answers refusals
            (client.me.backups[0], ops, attach, "worker", 200),
            (sched, [*SCHEDULER_OPS, "nope"], Message("status", id=2**62), "worker", 400),
            (sched, [*SCHEDULER_OPS, "nope"], Message("status", id=2**62), "server", 300),
            (sched, [*SCHEDULER_OPS, "nope"], Message("status", id=2**62), "reader", 200),
        ]
        assert client.me.backups[0]  # (the backup is up)
        started = time.monotonic()
        for address, fuzzed, check, role, examples in targets:
            _fuzz(address, fuzzed, check, role, examples)
        minutes = (time.monotonic() - started) / 60
        out = {"w": torch.zeros(4, 4)}
        assert client.wait(client.pull(out)).version >= 0
        assert bool(out["w"].isfinite().all())
        assert all(c.proc.poll() is None for c in cluster.children)
        client.close()
        cluster.wait(timeout=30)
    # thousands of bad messages from one peer: a line per peer per minute, not one each
    for name in ("server-0.log", "scheduler.log"):
        text = (cluster.run_dir / "logs" / name).read_text()
        lines = [ln for ln in text.splitlines() if "bad message" in ln or "refused a" in ln]
        assert 0 < len(lines) <= 2 * (2 + minutes), (name, len(lines))


def test_a_push_with_a_huge_weight_or_a_nan_scalar_is_refused_and_the_shard_goes_on(
    tmp_path,
) -> None:
    """A weight above float32's range once wedged the shard (acknowledged, then the update
    raised); a nan scalar reached every worker's mean. Both are refused alone; the same clock
    pushed well afterwards gives exactly plain SGD's step."""
    lc = launch_config(tmp_path, num_servers=1, num_workers=1, worker=None)
    with LocalCluster(lc) as cluster:
        client = PSClient(ClientConfig(scheduler=cluster.scheduler_address, timeout=10.0))
        w = torch.randn(4, 4)
        client.init({"w": w}, OptimizerConfig(name="sgd", lr=0.1))
        grads, out = {"w": torch.ones(4, 4)}, {"w": torch.zeros(4, 4)}
        bad: list[dict[str, object]] = [
            {"weight": 1e39},
            {"scalars": {"min.ctl_known": float("nan")}},
            {"scalars": {"loss": float("inf")}},
        ]
        for kwargs in bad:
            with pytest.raises(ProtocolError):
                client.wait(client.push_pull(grads, out, clock=0, **kwargs))  # type: ignore[arg-type]
        done = client.wait(client.push_pull(grads, out, clock=0, scalars={"loss": 2.0}))
        assert done.scalars == {"loss": 2.0}
        assert torch.equal(out["w"], w - 0.1 * grads["w"])
        assert all(c.proc.poll() is None for c in cluster.children)
        client.close()
        cluster.wait(timeout=30)


def test_a_peers_bad_messages_are_logged_once_a_minute(caplog) -> None:
    now = [0.0]
    bad = PeerLog(logging.getLogger("pslm.test"), per_s=60.0, max_peers=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="pslm.test"):
        assert bad.warning(b"a", "bad message: %s", 1)
        assert not any(bad.warning(b"a", "bad message: %s", i) for i in range(500))
        assert bad.warning(b"b", "bad message: %s", "b")  # another peer has its own minute
        now[0] = 61.0
        assert bad.warning(b"a", "bad message: %s", "again")
    assert [r.getMessage() for r in caplog.records] == [
        "bad message: 1",
        "bad message: b",
        "bad message: again (500 more from this peer left out of the log)",
    ]
    bad.warning(b"c", "x")  # a third peer: the quietest is forgotten, memory stays bounded
    assert len(bad) == 2
    assert bad.warning(b"b", "bad message: %s", "b")  # forgotten: logged again at once


def test_a_huge_key_space_and_a_role_s_wrong_op_are_refused_and_change_nothing(
    tmp_path,
) -> None:
    """An init whose key space would need more memory than the machine has is refused before
    anything is allocated; a norm, sync or update from a worker (only servers send them) and a
    shutdown from a worker or a server are refused as forbidden. The job is untouched: the
    next push gives exactly plain SGD's step."""
    lc = launch_config(tmp_path, num_servers=1, num_workers=1, worker=None)
    with LocalCluster(lc) as cluster:
        client = PSClient(ClientConfig(scheduler=cluster.scheduler_address, timeout=10.0))
        huge = KeySpace.build([("w", (1 << 24, 1 << 14))], 1)  # 2^38 parameters
        init = {
            "worker": 0,
            "keyspace": huge.to_dict(),
            "optimizer": OptimizerConfig(name="adamw", lr=0.1).to_dict(),
            "consistency": Consistency().to_dict(),
        }
        worker = Channel(timeout=10.0, role="worker")
        worker.connect("server", client.me.servers[0])
        worker.connect("scheduler", cluster.scheduler_address)
        with pytest.raises(RefusedError, match="would need .* GiB") as refused:
            worker.request("server", Message("init", body=init))
        assert refused.value.code == "too_large"
        w = torch.randn(4, 4)
        client.init({"w": w}, OptimizerConfig(name="sgd", lr=0.1))  # the server is still new
        small = client.layout.keyspace.to_dict()  # type: ignore[union-attr]
        for op, body in (
            ("norm", {"server": 0, "clock": 0, "sq": math.nan}),
            ("sync", {"shard": 0}),
            ("update", {"version": 0, "kind": "bsp"}),
        ):
            with pytest.raises(RefusedError, match=f"{op} is not for a worker") as refused:
                worker.request("server", Message(op, body=body))
            assert refused.value.code == "forbidden"
        server = Channel(timeout=10.0, role="server")
        server.connect("scheduler", cluster.scheduler_address)
        for channel in (worker, server):
            with pytest.raises(RefusedError, match="shutdown is not for a"):
                channel.request("scheduler", Message("shutdown"))
        # a worker cannot beat for a server (keeping a dead one alive) nor register as one
        for op, body in (
            ("heartbeat", {"node": "server-0"}),
            ("register", {"role": "server", "rank": -1, "address": "", "pid": 1}),
        ):
            with pytest.raises(RefusedError, match=f"{op} as a server from a worker"):
                worker.request("scheduler", Message(op, body=body))
        # the operator's role is not enough to steer: the run's credential is
        ctl = Channel(timeout=10.0, role="operator")
        ctl.connect("scheduler", cluster.scheduler_address)
        for credential in ({}, {"operator": "0" * 64}, {"operator": 7}):
            for op, body in (("ctl", {"action": "pause", "values": {}}), ("shutdown", {})):
                with pytest.raises(RefusedError, match="operator credential") as refused:
                    ctl.request("scheduler", Message(op, body={**body, **credential}))
                assert refused.value.code == "forbidden"
        ctl.close()
        # checkpoints are written and read inside the run directory only
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        for op, body in (
            ("save", {"worker": 0, "path": str(outside), "version": 0}),
            (
                "save",
                {"worker": 0, "path": str(cluster.run_dir / ".." / "elsewhere"), "version": 0},
            ),
            ("init", {**init, "keyspace": small, "restore": str(outside)}),
        ):
            with pytest.raises(RefusedError, match="outside the run directory") as refused:
                worker.request("server", Message(op, body=body))
            assert refused.value.code == "bad_path"
        assert not list(outside.iterdir())
        grads, out = {"w": torch.ones(4, 4)}, {"w": torch.zeros(4, 4)}
        client.wait(client.push_pull(grads, out, clock=0))
        assert torch.equal(out["w"], w - 0.1 * grads["w"])
        assert all(c.proc.poll() is None for c in cluster.children)
        worker.close()
        server.close()
        client.close()
        cluster.wait(timeout=30)
