"""Every exception pslm raises on purpose, in one place.

    PSLMError                      base of everything below
    ├── ConfigError (ValueError)    a setting or a command-line value is wrong; says which and why
    ├── ProtocolError              a message is malformed (bad header, sizes, dtypes, keys)
    │   └── RefusedError           a peer understood a request and refused it (wrong shape,
    │                              unknown key, not initialised); carries the peer's reason
    ├── TransportError             the network failed under us (a ZeroMQ error, mapped here)
    │   └── RequestTimeout (TimeoutError)
    │                              no reply within the configured time; nothing hangs forever
    ├── ClusterError               membership went wrong: registration refused, the scheduler
    │   │                          lost, a model declared differently by two workers
    │   └── Interrupted            a wait gave way to something more urgent (a lease changed);
    │                              the request is still pending and can be waited for again
    ├── LaunchError                a process started by the local launcher failed
    └── ShardFailed                a server's copy of its shard can no longer be trusted (an
                                   update failed half-way); the server leaves, its backup serves

Third-party errors are converted at the boundary (``raise TransportError(...) from exc``), so
callers catch pslm errors only. ``assert`` guards internal invariants, never user input.
"""

from __future__ import annotations


class PSLMError(Exception):
    """Base class of all pslm errors."""

    exit_code = 1
    """What a ``pslm`` command exits with when this error ends it."""


class ConfigError(PSLMError, ValueError):
    """A configuration value or command-line argument is invalid."""


class ProtocolError(PSLMError):
    """A message does not follow the wire protocol.

    ``request_id`` is the id of the offending request when its header was readable, and
    ``sender`` the ZeroMQ identity it came from, so that the receiver can still answer it.
    """

    request_id: int | None = None
    sender: bytes | None = None


class RefusedError(ProtocolError):
    """A peer refused a request; ``code`` names the reason class, the message says what to do."""

    def __init__(self, message: str, *, code: str = "refused", peer: str = "") -> None:
        super().__init__(f"{peer}: {message}" if peer else message)
        self.code = code
        self.peer = peer


class TransportError(PSLMError):
    """The transport failed (socket closed, address in use, peer unreachable)."""


class RequestTimeout(TransportError, TimeoutError):
    """A request got no reply within its timeout."""


class ClusterError(PSLMError):
    """Cluster membership or coordination failed."""


class LaunchError(PSLMError):
    """A process started by the local launcher exited unexpectedly or could not start."""


class Interrupted(ClusterError):
    """A wait returned early because its ``interrupt`` said so; the request is still pending."""


class ShardFailed(PSLMError):
    """A server's update failed part-way, so its copy of the shard is no longer one version:
    the server must stop serving it. It leaves, and the scheduler hands the shard to its
    backup (which holds the whole clock), drops it if it was the backup, or - no backup left -
    sends the job back to its checkpoint."""


class Diverged(PSLMError):
    """Training cannot go on: too many consecutive steps were skipped because a gradient was
    not finite (``train.max_skips``). A worker that raises it exits with its own code, so
    that the launcher ends the job instead of starting the worker again."""

    exit_code = 4
