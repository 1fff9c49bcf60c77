"""Classification metrics, computed by scikit-learn: accuracy, macro and per-class precision,
recall and F1, and the confusion matrix.

    report = classification_metrics(y_true, y_pred, labels=["neg", "pos"])
    print(format_report(report))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pslm.errors import ConfigError


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Metrics of predictions ``y_pred`` against ``y_true`` (indices into ``labels``).
    ConfigError if either holds an index that is not a label."""
    from sklearn.metrics import (  # heavy: only when evaluating
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    n = len(labels)
    if not y_true or len(y_true) != len(y_pred):
        raise ConfigError(
            f"need as many predictions as labels, got {len(y_pred)} and {len(y_true)}"
        )
    unknown = sorted({int(y) for y in [*y_true, *y_pred] if not 0 <= int(y) < n})
    if unknown:
        raise ConfigError(f"labels {unknown} are not among the {n} labels {list(labels)}")
    index = list(range(n))
    p, r, f, support = precision_recall_fscore_support(
        y_true, y_pred, labels=index, zero_division=0
    )
    mp, mr, mf, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=index, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro": {"precision": float(mp), "recall": float(mr), "f1": float(mf)},
        "per_class": {
            name: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=index).tolist(),
        "labels": list(labels),
        "n": len(y_true),
    }


def format_report(report: dict[str, Any], title: str = "") -> str:
    """The metrics as a plain-text table (per class, then macro and accuracy)."""
    width = max(12, *(len(n) for n in report["labels"]))
    lines = [title] if title else []
    lines.append(f"{'':{width}}  precision  recall     f1  support")
    for name, m in report["per_class"].items():
        lines.append(
            f"{name:{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:.4f}  "
            f"{m['support']:7d}"
        )
    mac = report["macro"]
    lines.append(
        f"{'macro':{width}}  {mac['precision']:9.4f}  {mac['recall']:6.4f}  {mac['f1']:.4f}  "
        f"{report['n']:7d}"
    )
    lines.append(f"{'accuracy':{width}}  {report['accuracy']:.4f}")
    return "\n".join(lines)
