"""The operator credential: what steering a running job (``ctl``, ``shutdown``) needs on top of
the cluster secret, which every role holds.

    token = ensure(run_dir)                 # the scheduler, at start: made once, 0600
    body["operator"] = read(run_dir)        # pslm ctl, the dashboard's /api/ctl
    check(msg.body.get("operator"), token)  # the scheduler: RefusedError (forbidden) if wrong

It is a random token in ``RUN/operator``, readable by its owner alone: whoever can read the run
directory as the user who started the job may steer it; a worker's bug, or a peer that only
knows the cluster secret, may not.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError, RefusedError

FILE = "operator"
FIELD = "operator"
"""The body field of a ``ctl`` or ``shutdown`` request that carries the credential."""


def ensure(run_dir: str | Path) -> str:
    """The run's credential: read, or made (owner-only) if the run has none yet."""
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read(run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    return read(run_dir)


def read(run_dir: str | Path) -> str:
    """The credential in ``RUN/operator``; ConfigError saying where it was looked for."""
    return read_file(Path(run_dir) / FILE)


def read_file(path: Path) -> str:
    """The credential in ``path`` (``pslm ctl --operator-file``); ConfigError if none."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the operator credential {path}: {exc.strerror} (steering a job "
            f"needs it: run as the user who started the job, or pass --operator-file)"
        ) from None
    if len(token) < 32:
        raise ConfigError(f"{path} holds no operator credential (RUN/operator holds one)")
    return token


def check(presented: Any, token: str) -> None:
    """RefusedError (``forbidden``) unless ``presented`` is ``token`` (constant time)."""
    if not isinstance(presented, str) or not hmac.compare_digest(
        presented.encode(errors="replace"), token.encode()
    ):
        raise RefusedError(
            "steering this job needs the operator credential (RUN/operator): pslm ctl --run "
            "RUN reads it",
            code="forbidden",
        )
