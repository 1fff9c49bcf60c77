"""Off loopback, traffic is encrypted unless a flag says otherwise: a command that binds or
connects beyond loopback (the scheduler, a server, a worker, ``pslm ctl``) starts only with
``--secure`` (CURVE) or ``--insecure`` (in clear), flags or PSLM_SECURE / PSLM_INSECURE, so
that every node of a cluster is told the same. On loopback nothing changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pslm.cli import _loopback
from tests.conftest import REPO

FAR = "10.255.1.2:9000"
"""A scheduler address beyond loopback (nothing answers there: nothing may try)."""
SECRET = "a-secret-for-the-secure-default-test"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSLM_")}
    return {**env, "PSLM_CACHE": os.environ.get("PSLM_CACHE", ""), "PYTHONPATH": str(REPO), **extra}


def _pslm(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pslm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or _env(),
    )


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("tcp://127.0.0.1:9000", True),
        ("127.0.0.1:*", True),
        ("tcp://127.3.2.1:1", True),
        ("localhost:9000", True),
        ("tcp://[::1]:9000", True),
        ("ipc:///tmp/pslm.sock", True),
        ("tcp://0.0.0.0:*", False),
        ("tcp://*:9000", False),
        ("10.0.0.1:9000", False),
        ("tcp://[::]:9000", False),
        ("scheduler.example:9000", False),
        ("tcp://eth0:9000", False),
    ],
)
def test_what_counts_as_loopback(address: str, loopback: bool) -> None:
    assert _loopback(address) is loopback


@pytest.mark.parametrize(
    "args",
    [
        ["scheduler", "--num-workers", "1", "--num-servers", "1", "--bind", "tcp://0.0.0.0:*"],
        ["scheduler", "--num-workers", "1", "--num-servers", "1", "--bind", "tcp://*:0"],
        ["server", "--scheduler", "127.0.0.1:1", "--bind", "tcp://0.0.0.0:*"],
        ["server", "--scheduler", FAR],
        ["run-worker", "tests.workers:nothing", "--scheduler", FAR],
        ["worker", "--scheduler", FAR],
        ["ctl", "--scheduler", FAR, "status"],
    ],
    ids=["scheduler", "scheduler-wildcard", "server-bind", "server", "run-worker", "worker", "ctl"],
)
def test_beyond_loopback_without_a_choice_is_one_line_and_starts_nothing(
    args: list[str], tmp_path: Path
) -> None:
    """No --secure, no --insecure: refused before anything is bound or connected to (the
    scheduler writes no address file and no cluster.json; a server or worker returns at once
    instead of trying to register for its timeout), with one line naming both flags."""
    extra = {
        "scheduler": ["--address-file", tmp_path / "addr", "--run-dir", tmp_path / "run"],
        "worker": ["--run-dir", tmp_path / "run"],
    }
    start = time.monotonic()
    res = _pslm(*args, *extra.get(args[0], []))
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pslm: error: "), res.stderr
    assert "is beyond loopback: pass --secure" in lines[0] and "--insecure" in lines[0]
    assert time.monotonic() - start < 30
    assert not (tmp_path / "addr").exists() and not (tmp_path / "run").exists()


def test_secure_and_insecure_together_are_refused() -> None:
    res = _pslm("server", "--scheduler", FAR, "--insecure", env=_env(PSLM_SECURE="1"))
    assert res.returncode == 1
    assert "--secure and --insecure contradict each other" in res.stderr


@pytest.mark.parametrize(
    "bind, flags, env, logged",
    [
        ("tcp://127.0.0.1:*", [], {}, ""),  # loopback: as before
        ("tcp://0.0.0.0:*", ["--insecure"], {}, "traffic is not encrypted"),
        ("tcp://0.0.0.0:*", [], {"PSLM_INSECURE": "1"}, "traffic is not encrypted"),
        ("tcp://0.0.0.0:*", ["--secure"], {"PSLM_SECRET": SECRET}, ""),
    ],
    ids=["loopback", "insecure", "insecure-env", "secure"],
)
def test_a_scheduler_with_a_choice_starts_and_answers(
    bind: str, flags: list[str], env: dict[str, str], logged: str, tmp_path: Path
) -> None:
    """It listens, says once that its traffic is in clear if so, and answers ``pslm ctl``
    (on loopback, with the scheduler's secret and mechanism)."""
    addr_file, log_path = tmp_path / "addr", tmp_path / "scheduler.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pslm", "scheduler", "--num-workers", "1", "--num-servers",
             "1", "--bind", bind, "--address-file", str(addr_file), *flags],
            stdout=log, stderr=subprocess.STDOUT, env=_env(**env),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not addr_file.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.05)
        port = addr_file.read_text().strip().rpartition(":")[2]
        secure = ["--secure"] if "--secure" in flags else []
        res = _pslm("ctl", "--scheduler", f"127.0.0.1:{port}", *secure, "status", "--json",
                    env=_env(**env))  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["num_servers"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log_path.read_text()
    if logged:
        assert text.count(logged) == 1, text
    else:
        assert "not encrypted" not in text, text
