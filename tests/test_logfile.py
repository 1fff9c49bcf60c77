"""metrics.jsonl as a crash leaves it: a torn or corrupt line is skipped by every reader."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from pslm.train.logfile import read_records
from pslm.train.records import MetricsLog
from pslm.train.report import report

TORN = '{"step": 3, "loss": 2.5, "staleness_hist": {"0": 3}'  # cut mid-line, ends in "}"


def _write(path: Path, steps: range, tail: str = "") -> list[dict[str, float]]:
    records = [
        {"step": s, "loss": 3.0 - 0.1 * s, "time": 0.5 * s, "tokens_per_s": 1e3} for s in steps
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return records


def test_torn_and_corrupt_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = _write(path, range(3), 'not json}\n[1, 2]\n{"step": -1}\n{"step": "4"}\n' + TORN)
    log = read_records(path)
    assert log.records == records and log.skipped == 5
    assert read_records(tmp_path / "missing.jsonl") == ([], 0)


def test_a_new_leader_starts_its_records_on_a_line_of_their_own(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write(path, range(3), TORN)  # the last leader died mid-line
    metrics = MetricsLog(path, SimpleNamespace(leader=True))  # type: ignore[arg-type]
    metrics.log({"step": 2, "loss": 9.0})  # logged already: not written again
    metrics.log({"step": 3, "loss": 2.7})
    metrics.close()
    log = read_records(path)
    assert [r["step"] for r in log.records] == [0, 1, 2, 3] and log.records[-1]["loss"] == 2.7
    assert log.skipped == 1


def test_report_skips_a_torn_last_line(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.jsonl", range(4), TORN)
    text = report(tmp_path).read_text()
    assert (tmp_path / "plots" / "loss_step.png").stat().st_size > 0
    assert "steps: 4," in text and "final training loss: 2.7000" in text
