"""The layering rules of DESIGN.md: imports only point downward, between packages and between
the planes of ``pslm/ps`` (REDESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pslm"

BASE = {"errors", "files"}
"""Modules every package and plane may import."""

ALLOWED = {
    "wire": BASE | {"wire"},
    "ps": BASE | {"wire", "ps"},
    "lm": BASE | {"lm"},
    "train": BASE | {"ps", "lm", "train"},
    "serve": BASE | {"ps", "lm", "serve"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


# the planes of pslm/ps: which parts of pslm each may import (``ps.X``: a plane, or
# ``ps.X.Y``: one module of it); top-level packages other than ps as in ALLOWED
SERVING = {"wire", "ps.core", "ps.control.node", "ps.control.table"}
"""What the server and client planes share: the wire, the core, nodes and the shard table."""

PLANES = {
    "core": BASE | {"wire", "ps.core"},
    "control": BASE | {"wire", "ps.core", "ps.control"},
    "server": BASE | SERVING | {"ps.server"},
    "client": BASE | SERVING | {"ps.control.leases", "ps.client"},
    "launch": BASE | {"wire", "ps.core", "ps.control", "ps.client", "ps.launch"},
}


def _allowed(name: str, rules: set[str]) -> bool:
    """Whether ``pslm.<name>`` (dotted, without ``pslm.``) falls under one of ``rules``."""
    return any(name == r or name.startswith(r + ".") for r in rules)


def _modules(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downward(layer: str) -> None:
    for path in _modules(layer):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "pslm" and len(parts) > 1:
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(PKG)} imports {name}"


@pytest.mark.parametrize("plane", sorted(PLANES))
def test_planes_of_ps_import_only_what_their_rules_allow(plane: str) -> None:
    for path in _modules(f"ps/{plane}"):
        for name in _imports(path):
            if not name.startswith("pslm."):
                continue
            ok = _allowed(name.removeprefix("pslm."), PLANES[plane])
            assert ok, f"{path.relative_to(PKG)} imports {name} (not in {sorted(PLANES[plane])})"


def test_every_module_of_ps_lies_in_a_plane() -> None:
    loose = {p.name for p in (PKG / "ps").glob("*.py")} - {"__init__.py", "plan.py"}
    assert not loose, f"pslm/ps/{sorted(loose)} belong in one of {sorted(PLANES)}"


@pytest.mark.parametrize("layer", ["wire", "ps"])
def test_wire_and_ps_know_tensors_not_modules(layer: str) -> None:
    for path in _modules(layer):
        bad = [n for n in _imports(path) if n == "torch.nn" or n.startswith("torch.nn.")]
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_scheduler_starts_without_torch() -> None:
    code = "import sys, pslm.ps.control.scheduler, pslm.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
