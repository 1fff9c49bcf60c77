"""Logging what a peer did wrong without letting it flood the log.

    bad = PeerLog(log, per_s=60.0)
    bad.warning(peer, "bad message: %s", exc)    # once per peer per minute; the rest counted

A buggy or hostile peer can send thousands of bad messages a second; each is refused, but only
the first per peer per ``per_s`` seconds is logged, and the next logged line says how many
were left out. At most ``max_peers`` peers are remembered (the longest quiet forgotten first).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable


class PeerLog:
    def __init__(
        self,
        log: logging.Logger,
        *,
        per_s: float = 60.0,
        max_peers: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log = log
        self.per_s = per_s
        self.max_peers = max_peers
        self.clock = clock
        self._peers: OrderedDict[bytes, tuple[float, int]] = OrderedDict()
        """Peer -> (when its last line was logged, how many were left out since)."""

    def __len__(self) -> int:
        """How many peers are remembered."""
        return len(self._peers)

    def warning(self, peer: bytes | None, fmt: str, *args: object) -> bool:
        """Log ``fmt % args`` for ``peer`` unless it had a line within ``per_s`` seconds;
        returns whether it was logged."""
        key = peer or b""
        now = self.clock()
        last, quiet = self._peers.pop(key, (None, 0))
        if last is not None and now - last < self.per_s:
            self._peers[key] = (last, quiet + 1)
            return False
        if quiet:
            fmt += " (%d more from this peer left out of the log)"
            args = (*args, quiet)
        self.log.warning(fmt, *args)
        self._peers[key] = (now, 0)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return True
