"""The layering rules of DESIGN.md: imports only point downward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pslm"

ALLOWED = {
    "wire": {"errors", "wire"},
    "ps": {"errors", "wire", "ps"},
    "lm": {"errors", "lm"},
    "train": {"errors", "ps", "lm", "train"},
    "serve": {"errors", "ps", "lm", "serve"},
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


def _modules(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downward(layer: str) -> None:
    for path in _modules(layer):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "pslm" and len(parts) > 1:
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(PKG)} imports {name}"


@pytest.mark.parametrize("layer", ["wire", "ps"])
def test_wire_and_ps_know_tensors_not_modules(layer: str) -> None:
    for path in _modules(layer):
        bad = [n for n in _imports(path) if n == "torch.nn" or n.startswith("torch.nn.")]
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_scheduler_starts_without_torch() -> None:
    code = "import sys, pslm.ps.scheduler, pslm.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
