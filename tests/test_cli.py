"""The command line: help for every command, one clear line for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = ["scheduler", "server", "run-worker", "worker", "demo", "bench", "serve", "ctl"]


def pslm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pslm", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    res = pslm(*([command] if command else []), "--help")
    assert res.returncode == 0 and "usage: pslm" in res.stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["server"], {"PSLM_SCHEDULER": ""}, "--scheduler is required (or set PSLM_SCHEDULER)"),
        (["server", "--scheduler", "x"], {}, "not an address: 'x'"),
        (["server"], {"PSLM_RANK": "first", "PSLM_SCHEDULER": "h:1"}, "PSLM_RANK='first'"),
        (["scheduler", "--num-workers", "0", "--num-servers", "1"], {}, "at least one worker"),
        (["scheduler", "--num-servers", "1"], {"PSLM_NUM_WORKERS": ""}, "--num-workers is req"),
        (["run-worker", "no_such_module:f", "--scheduler", "127.0.0.1:1"], {}, "cannot load"),
        (["run-worker", "m:f", "--scheduler", "h:1", "--args", "[1]"], {}, "JSON object"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], env: dict[str, str], message: str) -> None:
    res = pslm(*args, env=env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pslm: error: ") and message in lines[0]


def test_unknown_command_is_a_usage_error() -> None:
    res = pslm("fly")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_demo_refuses_a_directory_that_holds_something(tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    res = pslm("demo", "--run-dir", str(tmp_path))
    assert res.returncode == 1 and "not an empty directory" in res.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
