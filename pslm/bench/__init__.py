"""Benchmarks behind ``pslm bench NAME``: each compares pslm with a baseline in the same run.

Every benchmark prints a table, or with ``--json`` one JSON object as its last line.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from rich.console import Console
from rich.table import Table

BENCHES = {
    "transport": "pslm.bench.transport",
    "pipeline": "pslm.bench.pipeline",
    "ps": "pslm.bench.ps",
    "train": "pslm.bench.train",
    "quality": "pslm.bench.quality",
    "consistency": "pslm.bench.consistency",
    "recovery": "pslm.bench.recovery",
    "overlap": "pslm.bench.overlap",
    "serve": "pslm.bench.serve",
    "launchers": "pslm.bench.launchers",
}


def run_bench(name: str, *, as_json: bool, quick: bool) -> int:
    """Run benchmark ``name`` and print its result; returns the exit code."""
    module = importlib.import_module(BENCHES[name])
    result: dict[str, Any] = module.run(quick=quick)
    if as_json:
        print(json.dumps(result))
    else:
        _print_table(name, result)
    return 0


def _print_table(name: str, result: dict[str, Any]) -> None:
    table = Table(title=f"pslm bench {name}")
    rows = result.get("rows", [])
    if rows:
        for key in rows[0]:
            table.add_column(key)
        for row in rows:
            table.add_row(*(_fmt(v) for v in row.values()))
    Console().print(table)
    for key, value in result.items():
        if key != "rows":
            print(f"{key}: {_fmt(value)}")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
