"""Only peers with the cluster secret get in; garbage never brings a node down."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
import zmq

from pslm.errors import RequestTimeout, TransportError
from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.launch.local import LocalCluster
from pslm.wire import auth
from pslm.wire.auth import MIN_SECRET, Security
from pslm.wire.message import Message
from pslm.wire.transport import Channel, Connection, Listener, Poller
from tests.conftest import launch_config


@pytest.fixture(params=[False, True], ids=["plain", "curve"])
def cluster(request, tmp_path):
    lc = launch_config(tmp_path, num_servers=1, num_workers=1, worker=None, secure=request.param)
    with LocalCluster(lc) as c:
        yield c
    auth.install(None)


def _asks(name: str, address: str, security: Security | None, timeout: float = 0.6) -> dict:
    """Ask ``address`` for its status as a peer holding ``security`` (a refused peer gets no
    answer: the request times out)."""
    auth.install(security)
    channel = Channel(timeout=timeout)
    try:
        channel.connect(name, address)
        return channel.request(name, Message("status")).body
    finally:
        channel.close()


def test_a_peer_without_the_secret_is_refused_and_logged(cluster) -> None:
    right = Security.from_secret(cluster.secret, encrypt=cluster.cfg.secure)
    wrong = Security.from_secret("not-the-cluster-secret", encrypt=cluster.cfg.secure)
    other_mechanism = Security.from_secret(cluster.secret, encrypt=not cluster.cfg.secure)
    with pytest.raises(RequestTimeout, match="wrong cluster secret"):
        auth.install(wrong)
        PSClient(ClientConfig(scheduler=cluster.scheduler_address, register_timeout=1.5))
    auth.install(right)
    client = PSClient(ClientConfig(scheduler=cluster.scheduler_address, timeout=10))
    addresses = {"scheduler": cluster.scheduler_address, "server-0": client.me.servers[0]}
    for name, address in addresses.items():
        for security in (wrong, None, other_mechanism):
            with pytest.raises(RequestTimeout):
                _asks(name, address, security)
    assert _asks("scheduler", cluster.scheduler_address, right, 10.0)["num_servers"] == 1
    logs = {p.name: p.read_text() for p in (cluster.run_dir / "logs").glob("*.log")}
    for name in ("scheduler.log", "server-0.log"):
        assert "did not prove the cluster secret" in logs[name], name  # the peer with none
        if not cluster.cfg.secure:  # under CURVE a wrong key fails before the secret check
            assert "wrong cluster secret" in logs[name], name
    # the cluster still works for those who know the secret
    auth.install(right)
    out = {"w": torch.zeros(4)}
    client.init({"w": torch.ones(4)}, OptimizerConfig(name="sgd", lr=1.0))
    client.wait(client.push_pull({"w": torch.ones(4)}, out, clock=0))
    assert torch.equal(out["w"], torch.zeros(4))
    client.close()


def test_secret_files_and_settings_are_checked(tmp_path: Path) -> None:
    from tests.test_train import pslm

    short = tmp_path / "short"
    short.write_text("tiny")
    res = pslm("scheduler", "--num-workers", "1", "--num-servers", "1", "--secret-file", short)
    assert res.returncode == 1 and "at least 16 characters" in res.stderr
    res = pslm("server", "--scheduler", "127.0.0.1:1", "--secret-file", tmp_path / "none")
    assert res.returncode == 1 and "cannot read the secret file" in res.stderr
    env = {**os.environ, "PSLM_SECURE": "1"}
    env.pop("PSLM_SECRET", None)
    res = pslm("server", "--scheduler", "127.0.0.1:1", env=env)
    assert res.returncode == 1 and "--secure needs a cluster secret" in res.stderr


@pytest.fixture
def restore_security():
    security = auth.current()
    yield
    auth.install(security)


def _ping(listener: Listener, timeout: float) -> Message:
    channel = Channel(timeout=timeout)
    try:
        channel.connect("l", listener.address)
        rid = channel.send("l", Message("ping"))
        if Poller(listener).poll(timeout):
            peer, msg = listener.recv()
            listener.send(peer, msg.reply())
        return channel.wait([rid])[rid]
    finally:
        channel.close()


def test_a_secret_longer_than_plain_allows_still_proves_itself(restore_security) -> None:
    secret = "s" * 300  # PLAIN carries passwords of at most 255 bytes
    auth.install(Security.from_secret(secret))
    listener = Listener()
    try:
        assert _ping(listener, 10.0).op == "ok"
        auth.install(Security.from_secret(secret[:-1] + "t"))  # differs past byte 255
        with pytest.raises(RequestTimeout):
            _ping(listener, 0.5)
    finally:
        listener.close()


def test_a_socket_whose_security_setup_fails_is_closed(monkeypatch, restore_security) -> None:
    configured: list[zmq.Socket] = []

    def fail(self: Security, sock: zmq.Socket) -> None:
        configured.append(sock)
        raise zmq.ZMQError(errno.EINVAL)

    monkeypatch.setattr(Security, "present", fail)
    monkeypatch.setattr(Security, "serve", fail)
    auth.install(Security.from_secret("x" * MIN_SECRET))
    with pytest.raises(TransportError):
        Connection("tcp://127.0.0.1:1", send_timeout=1.0)
    with pytest.raises(TransportError):
        Listener()
    assert len(configured) == 2 and all(sock.closed for sock in configured)
