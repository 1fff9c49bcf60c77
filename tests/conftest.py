from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pslm.ps.launch.local import LaunchConfig

REPO = Path(__file__).resolve().parents[1]


def launch_config(tmp_path: Path, **overrides: Any) -> LaunchConfig:
    """A LaunchConfig whose children can import the ``tests`` package."""
    kw: dict[str, Any] = {
        "run_dir": str(tmp_path / "run"),
        "env": {"PYTHONPATH": str(REPO)},
        "timeout": 30.0,
    }
    kw.update(overrides)
    return LaunchConfig(**kw)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.fixture(autouse=True, scope="session")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared token files go to a temporary cache, shared by the session's processes."""
    path = tmp_path_factory.mktemp("pslm-cache")
    os.environ["PSLM_CACHE"] = str(path)
    return path
