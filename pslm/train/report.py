"""``pslm report``: PNG plots of a run and a short Markdown summary linking them.

    path = report(Path("runs/bbc-news-20261125-101500"))   # runs/.../report.md

Plots (``plots/`` in the run): training and validation loss against step and against wall
time, tokens/s against step, and for a fine-tuned classifier that was evaluated
(``eval.json``) the confusion matrices of the model and of the TF-IDF baseline.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError
from pslm.train.logfile import read_records

log = logging.getLogger(__name__)


def report(run_dir: Path) -> Path:
    """Write ``plots/*.png`` and ``report.md`` into ``run_dir``; returns the Markdown file."""
    records = _records(run_dir / "metrics.jsonl")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    val = [r for r in records if "val_loss" in r]
    made = []
    for x, name, label in (("step", "loss_step.png", "step"), ("time", "loss_time.png", "s")):
        fig, ax = plt.subplots(figsize=(6, 4))
        losses = [math.nan if r["loss"] is None else r["loss"] for r in records]  # skipped
        ax.plot([r[x] for r in records], losses, lw=0.8, label="train")
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots / name, dpi=100)
        plt.close(fig)
        made.append(name)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["step"] for r in records], [r["tokens_per_s"] for r in records], lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots / "tokens_per_s.png", dpi=100)
    plt.close(fig)
    made.append("tokens_per_s.png")
    result = _eval(run_dir)
    if result is not None:
        for key in ("model", "baseline"):
            if key in result:
                _confusion(plt, result[key], plots / f"confusion_{key}.png", key)
                made.append(f"confusion_{key}.png")
    path = run_dir / "report.md"
    path.write_text(_markdown(run_dir, records, val, result, made))
    return path


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"no metrics.jsonl in {path.parent}: nothing to report")
    records, skipped = read_records(path)
    if skipped:
        log.warning("%s: skipped %d line(s) that are not records (torn or corrupt)", path, skipped)
    if not records:
        raise ConfigError(f"{path} holds no steps yet")
    return records


def _eval(run_dir: Path) -> dict[str, Any] | None:
    try:
        result = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "model" in result else None


def _confusion(plt: Any, metrics: dict[str, Any], path: Path, title: str) -> None:
    labels, matrix = metrics["labels"], metrics["confusion"]
    size = 2.5 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "k")
    ax.set_title(f"{title}: accuracy {metrics['accuracy']:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(
    run_dir: Path,
    records: list[dict[str, Any]],
    val: list[dict[str, Any]],
    result: dict[str, Any] | None,
    plots: list[str],
) -> str:
    last = records[-1]
    lines = [
        f"# {run_dir.name}",
        "",
        f"- steps: {last['step'] + 1}, wall time {last['time']:.0f} s",
        f"- final training loss: {_loss(last['loss'])}",
    ]
    skipped = [r["step"] + 1 for r in records if "skipped" in r]
    if skipped:
        lines.append(f"- skipped steps (a gradient was not finite): {skipped}")
    if val:
        lines.append(
            f"- final validation loss: {val[-1]['val_loss']:.4f} (step {val[-1]['step'] + 1})"
        )
    lines.append(f"- median tokens/s: {statistics.median(r['tokens_per_s'] for r in records):,.0f}")
    if result is not None:
        lines += [
            "",
            "## Test split",
            "",
            "| | accuracy | macro precision | macro recall | macro F1 |",
        ]
        lines.append("|---|---|---|---|---|")
        for key in ("model", "baseline"):
            if key in result:
                m = result[key]
                name = "fine-tuned" if key == "model" else m.get("name", "baseline")
                mac = m["macro"]
                lines.append(
                    f"| {name} | {m['accuracy']:.4f} | {mac['precision']:.4f} | "
                    f"{mac['recall']:.4f} | {mac['f1']:.4f} |"
                )
    lines += ["", "## Plots", ""]
    lines += [f"![{p}](plots/{p})" for p in plots]
    return "\n".join(lines) + "\n"


def _loss(value: float | None) -> str:
    return "- (skipped)" if value is None else f"{value:.4f}"
