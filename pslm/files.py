"""Writing a small file so that no crash and no concurrent writer leaves it half written.

    write_atomic(run_dir / "model.json", json.dumps(doc))

The text goes to a temporary file beside the target, is flushed to disk, and replaces the
target in one rename; the directory is then flushed too, so the rename itself survives a
power cut. Readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename or a new file in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
