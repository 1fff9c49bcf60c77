"""Reading metrics.jsonl, whatever a crash left in it.

    log = read_records(run_dir / "metrics.jsonl")
    log.records      # the step records, in file order
    log.skipped      # lines that were not one: torn by a kill, or corrupt

A line counts when it parses as a JSON object with an integer ``step``; every reader of the
file (resume, the progress bar, the summary, ``pslm report``) skips the others, so a torn last
line that happens to end in ``}`` cannot stop a resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple


class MetricsFile(NamedTuple):
    records: list[dict[str, Any]]
    skipped: int
    """Lines that were not a record."""


def read_records(path: Path) -> MetricsFile:
    """The records of ``path`` (none if it is missing) and how many lines were skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return MetricsFile([], 0)
    records, skipped = [], 0
    for line in text.splitlines():
        record = parse_record(line)
        if record is None:
            skipped += line.strip() != ""
        else:
            records.append(record)
    return MetricsFile(records, skipped)


def parse_record(line: str) -> dict[str, Any] | None:
    """The record on ``line``, or None where it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and type(record.get("step")) is int and record["step"] >= 0
    return record if ok else None
