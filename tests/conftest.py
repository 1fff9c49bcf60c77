from __future__ import annotations

from pathlib import Path
from typing import Any

from pslm.ps.launch import LaunchConfig

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
