"""Role commands across hosts: one Linux network namespace per host, joined by veth pairs to a
bridge in a namespace of its own (the switch). The scheduler, two servers and two workers
(`pslm scheduler|server|worker`) each run in their own host and talk over 10.77.0.0/24; then
worker 1's cable is pulled (`ip link set ... down` on the switch) and the scheduler must find
it dead and worker 0 finish the job with its share. Off loopback every role must say how its
traffic goes: here encrypted (PSLM_SECURE=1, CURVE). The test makes and removes its own
namespaces; it needs root and iproute2, and is skipped, saying so, without them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_train import CONFIG, _story

STEPS = 300
SECRET = "a-secret-for-the-namespace-test-only"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Network:
    """Hosts (namespaces) with addresses 10.77.0.N/24 on one switch (a bridge in its own
    namespace); ``cut(host)`` takes a host's cable out."""

    def __init__(self, hosts: list[str]):
        tag = os.getpid() % 100000
        self.prefix = f"pslm{tag}"
        self.switch = f"{self.prefix}sw"
        self.ns: dict[str, str] = {}
        self.addr: dict[str, str] = {}
        self.port: dict[str, str] = {}  # host -> its cable's end on the switch
        _ip("netns", "add", self.switch)
        _ip("netns", "exec", self.switch, "ip", "link", "add", "br0", "type", "bridge")
        _ip("netns", "exec", self.switch, "ip", "link", "set", "br0", "up")
        for i, host in enumerate(hosts, start=1):
            ns, inside, outside = f"{self.prefix}{host}", f"v{tag}h{i}", f"v{tag}s{i}"
            _ip("netns", "add", ns)
            self.ns[host] = ns
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "netns", self.switch)
            _ip("netns", "exec", self.switch, "ip", "link", "set", outside, "master", "br0")
            _ip("netns", "exec", self.switch, "ip", "link", "set", outside, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"10.77.0.{i}/24", "dev", inside)
            _ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self.addr[host] = f"10.77.0.{i}"
            self.port[host] = outside

    def cut(self, host: str) -> None:
        _ip("netns", "exec", self.switch, "ip", "link", "set", self.port[host], "down")

    def remove(self) -> None:
        for ns in [*self.ns.values(), self.switch]:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def _remove_all() -> None:
    """Every namespace of this test process (a setup that failed half-way)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"pslm{os.getpid() % 100000}"):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@pytest.fixture()
def network() -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    hosts = ["sched", "s0", "s1", "w0", "w1"]
    try:
        net = Network(hosts)
    except subprocess.CalledProcessError as exc:
        _remove_all()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode().strip()}")
    try:
        yield net
    finally:
        net.remove()


def test_role_commands_across_hosts_and_a_cut_cable(network: Network, tmp_path: Path) -> None:
    (tmp_path / "story.txt").write_text(_story())
    config = CONFIG.replace("steps = 30", f"steps = {STEPS}").replace(
        "checkpoint_interval = 10", "checkpoint_interval = 100"
    )
    (tmp_path / "tiny.toml").write_text(config)
    run = tmp_path / "run"
    sched = f"{network.addr['sched']}:9000"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PSLM_SECRET": SECRET, "PSLM_SECURE": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(host: str, *args: str) -> None:
        with open(tmp_path / f"{host}.log", "wb") as log:
            procs[host] = subprocess.Popen(
                ["ip", "netns", "exec", network.ns[host], sys.executable, "-m", "pslm", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def records() -> list[dict]:
        path = run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(x) for x in lines if x.endswith("}")]

    def logs() -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in tmp_path.glob("*.log"))

    try:
        start("sched", "scheduler", "--num-workers", "2", "--num-servers", "2",
              "--bind", f"tcp://{sched}", "--run-dir", str(run),
              "--heartbeat-interval", "0.5", "--heartbeat-timeout", "2")  # fmt: skip
        for s in ("s0", "s1"):
            start(s, "server", "--scheduler", sched, "--bind", f"tcp://{network.addr[s]}:*")
        for r, w in enumerate(("w0", "w1")):
            start(w, "worker", "--scheduler", sched, "--rank", str(r), "--timeout", "10",
                  "--config", str(tmp_path / "tiny.toml"), "--data", str(tmp_path / "story.txt"),
                  "--run-dir", str(run))  # fmt: skip
        deadline = time.monotonic() + 120
        while len(records()) < 40:  # both hosts train, over the network
            assert time.monotonic() < deadline, "no training across the hosts\n" + logs()
            assert all(p.poll() is None for p in procs.values()), logs()
            time.sleep(0.1)
        assert records()[-1]["trained_by"] == [0, 1]
        network.cut("w1")
        try:
            procs["w0"].wait(timeout=120)  # worker 0 finishes the job alone
        except subprocess.TimeoutExpired:
            raise AssertionError("the job did not finish after the cut\n" + logs()) from None
        assert procs["w0"].returncode == 0, logs()
        procs["sched"].wait(timeout=60)
        assert procs["sched"].returncode == 0, logs()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    recs = records()
    assert [r["step"] for r in recs] == list(range(STEPS))  # every step once
    assert recs[-1]["trained_by"] == [0, 0]  # worker 0 trained worker 1's share too
    assert "worker-1 is dead: missed heartbeats" in (tmp_path / "sched.log").read_text()
    assert (run / "checkpoints" / f"step_{STEPS:07d}").is_dir()
    cluster = json.loads((run / "cluster.json").read_text())
    hosts = {n["address"].split("//")[1].split(":")[0] for n in cluster["nodes"] if n["address"]}
    assert hosts == {network.addr["s0"], network.addr["s1"]}  # each server on its own host
