"""Random and malformed messages sent straight to a live server's and scheduler's sockets."""

from __future__ import annotations

import logging
import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pslm.errors import ProtocolError
from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.launch.local import LocalCluster
from pslm.wire import auth
from pslm.wire.message import Message, decode, encode
from pslm.wire.peerlog import PeerLog
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
        "body": draw(bodies),
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


def _probe(sock: zmq.Socket, frames: list[bytes], check: Message) -> None:
    """Send ``frames`` then a valid request, which must be answered; a refusal says why."""
    sock.send_multipart(frames)
    sock.send_multipart(encode(check))
    while True:
        assert sock.poll(10_000), "no answer to a valid request after a malformed one"
        reply = decode(sock.recv_multipart())
        if reply.id == check.id and reply.op != "error":
            return
        if reply.op == "error":
            assert isinstance(reply.body.get("message"), str) and reply.body["message"]


def _fuzz(address: str, ops: list[str], check: Message) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security = auth.current()
    assert security is not None  # the launcher made up a secret and installed it here
    security.present(sock)  # an insider gone mad: outsiders do not get this far
    sock.connect(address)

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages(ops))
    def fuzz(frames: list[bytes]) -> None:
        _probe(sock, frames, check)

    try:
        fuzz()
    finally:
        sock.close()


def test_server_and_scheduler_survive_random_messages(tmp_path) -> None:
    lc = launch_config(tmp_path, num_servers=1, num_workers=1, worker=None)
    with LocalCluster(lc) as cluster:
        client = PSClient(ClientConfig(scheduler=cluster.scheduler_address, timeout=10.0))
        w = torch.randn(4, 4)
        client.init({"w": w}, OptimizerConfig(name="sgd", lr=0.1))
        targets = {
            "server": (
                client.me.servers[0],
                ["init", "push", "pull", "norm", "attach", "nope"],
                Message("pull", id=2**62, body={"worker": 0, "min_version": 0}),
            ),
            "scheduler": (
                cluster.scheduler_address,
                [
                    "register",
                    "heartbeat",
                    "barrier",
                    "declare",
                    "keyspace",
                    "status",
                    "leave",
                    "nope",
                ],
                Message("status", id=2**62),
            ),
        }
        started = time.monotonic()
        for address, ops, check in targets.values():
            _fuzz(address, ops, check)
        minutes = (time.monotonic() - started) / 60
        out = {"w": torch.zeros(4, 4)}
        assert client.wait(client.pull(out)).version >= 0
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
