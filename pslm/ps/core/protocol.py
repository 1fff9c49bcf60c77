"""The parameter-server protocol: which ops exist, who sends them, and what their bodies hold.

Every message is a ``pslm.wire.Message``; ``id`` 0 marks a notice (no reply expected).

To the scheduler (from any node unless said otherwise):
    register   {role, rank (-1: any), address, pid (required, 1 to 2**31-1), host}
               -> {id, rank, num_workers, num_servers, heartbeat_interval,
                   heartbeat_timeout, late, shard, primary, table, servers, backups}; sent once
               the cluster is complete. With replicas, server ranks from num_servers on are
               backups (``shard`` = rank mod num_servers, ``primary`` false). A worker
               registering later takes a dead worker's rank (``late``); a server registering
               later takes a dead server's rank and becomes the backup of a shard without one
    heartbeat  {node, stats: {name: number}} -> {stop: bool, leases: version of the share
               leases, epoch, steering, table, servers, backups}: ``stats`` what the node
               reports (servers: bytes in and out, messages, version, shard; workers:
               shares_move), ``steering`` the newest live settings (``pslm.ps.core.steering``),
               the shard table (``table`` its version; ``servers`` the
               address serving each shard, ``backups`` its backup's or ""); ``epoch`` names
               the scheduler's incarnation (also in the register reply): when it changes, a
               node sends its unanswered requests again (a restarted scheduler, ``--recover``,
               takes them; every op to the scheduler is safe to repeat)
    barrier    {node, name, group: workers|servers|all, values: {name: number}}
               -> {values: each summed over the group} once every member arrived: the
               group's live nodes when it began (workers: those holding shares), less the
               dead; a member arriving after the release gets the same answer
    declare    {node, keyspace} (workers) -> {fingerprint}; refused if it differs from the
               key space declared first
    keyspace   {} -> {keyspace}
    leases     {node} -> {version, holders: [worker by share], starts: {share: clock},
               moving: {share: worker}, retired: [worker], stop}
    release    {node, share, clock} (the holder of a moving share) -> the new leases; the
               share's new holder pushes it from ``clock``
    finalize   {node} (workers) -> {} once every live worker holding shares finalized (at
               once if the cluster is stopping); the servers are then told to shut down
    leave      {node} (servers, on exit) -> {}; a server leaving a running job that did not
               stop (Ctrl-C, an error) is handled as a dead one: its backup serves its shard
    shutdown   {} -> {}; stops the whole cluster
    status     {} -> {nodes: [...], num_workers, num_servers, keyspace (its fingerprint),
               run_dir, table, servers, backups}
    ctl        {action: set|pause|resume|checkpoint, values} -> {steering}: a new version of
               the live settings (``pslm ctl``); {action: remove-worker, node} -> {removed,
               moves}: the worker's shares move to others, then it leaves; {action:
               add-worker} -> {add_workers}: the launcher is asked for a worker (cluster.json)
    steering   {version (default: the newest)} -> {steering}: that version of the settings

Notices from the scheduler:
    shutdown   {} (to servers)
    steering   {the new version of the live settings} (to workers, when ``ctl`` made one)

To a server (from workers):
    init       {worker, keyspace, optimizer, consistency, restore, clock} + initial values,
               one tensor per piece and one per row chunk (none with ``restore``: the
               directory of a checkpoint whose shard file the server loads instead) ->
               {version}; idempotent for the same key space and optimizer; ``clock``: where
               every worker's clock starts (a resumed run)
    push       {worker, share, clock, seq, weight, reply_params, scalars: {name: number},
               codec, pull_codec, sq_norm (SSP/ASP with clipping), keys, runs, row_keys,
               final, priority}
               + gradients (``pslm.ps.server.intake``: all dense chunks as pieces, or the chunks
               ``keys`` one by one; then rows of the row chunks ``row_keys``) -> {version} at
               once, or, with reply_params, the same chunks' values after the update (rows: the
               rows asked for) with {scalars: each one's weighted mean over the workers (names
               starting ``min.``: the minimum; they carry live settings, to every server),
               held_s: seconds the push waited}. A worker's push for a clock may come in parts
               (overlap); it is applied once every chunk and the ``final`` part have arrived,
               and replies go out in increasing ``priority``. Pushes are keyed by ``share``
               (default: the worker's rank), and a message of a (share, clock, seq) taken
               already is answered as the first was, never applied twice (BSP replies carry
               ``by``: the worker whose push of each share the update took).
    pull       {worker, min_version, clock, keys (null: all)} -> {version} + one tensor per
               piece and one per row chunk (all) or one per key; answered once the server's
               version >= min_version (BSP) or the staleness gate lets ``clock`` read
    save       {worker, path, version} -> {file, bytes}: the shard (parameters, optimizer
               state) written into the existing directory ``path``; refused unless the
               server is at ``version``

    fence      {worker, clock, consistency} (the leading worker; ``pslm ctl set consistency``)
               -> {clock}: from ``clock`` on, the new model; once every push before it is
               applied the server switches, and the replies that let workers read at
               ``clock`` carry {mode: the model}; refused from ASP, to or from local SGD, or if
               a read at ``clock`` was answered already (``bad_clock``)

To a server (from readers: serving processes, which take no part in training):
    read       {keys, min_version, pull_codec} -> {version} + one tensor per key (keys []:
               the version alone); at once, or under BSP with min_version up to
               READ_AHEAD past the version, as soon as that version is applied (so
               readers asking every server for one version get that version from each);
               refused by a backup (``backup``)

Between servers (notices):
    norm       {server, clock, sq} the server's part of the squared global gradient norm
               (``server``: the shard); sent again to a server that takes a shard over

From a shard's server to its backup (requests):
    sync       {shard, keyspace, optimizer, consistency, version, clocks, scalars, by, norms,
               names} + one tensor per name (params, steps, state.*) -> {version}: the whole
               shard, replacing whatever the backup held
    update     {kind: bsp|async|local, version, multiplier, step, share, scalars, by, sq}
               + the reduced gradient (a tensor per dense chunk; rows and values per row
               chunk) -> {version}, before the backup applies it; refused as ``not_synced``
               unless the backup is at ``version`` (the server then sends ``sync``)

Every refusal is ``error {code, message}`` with the request's id.
"""

from __future__ import annotations

import math
from typing import Any

from pslm.errors import ProtocolError, RefusedError
from pslm.wire.message import Message

ROLES = ("server", "worker")
GROUPS = ("workers", "servers", "all")

_MEMBERS = frozenset({"server", "worker"})
_ANYONE = frozenset({"scheduler", "server", "worker", "reader", "operator"})
ALLOWED: dict[str, frozenset[str]] = {
    # a server's ops
    **dict.fromkeys(("init", "push", "pull", "save", "fence", "attach"), frozenset({"worker"})),
    "read": frozenset({"worker", "reader"}),
    **dict.fromkeys(("norm", "sync", "update"), frozenset({"server"})),
    # the scheduler's
    **dict.fromkeys(("register", "heartbeat", "leave"), _MEMBERS),
    **dict.fromkeys(
        ("barrier", "declare", "finalize", "leases", "release", "steering"), frozenset({"worker"})
    ),
    "backup": frozenset({"server"}),
    **dict.fromkeys(("status", "keyspace"), _ANYONE),
    **dict.fromkeys(("ctl", "shutdown"), frozenset({"operator", "reader"})),
}
"""Op -> the roles that may send it (the role a peer proved when it connected,
``pslm.wire.auth``; without a cluster secret nothing is proved and nothing is checked). ``ctl``
also needs the operator credential (``pslm.ps.control.operations``)."""


def check_sender(msg: Message) -> None:
    """RefusedError (``forbidden``) unless ``msg``'s sender may send its op."""
    allowed = ALLOWED.get(msg.op)
    if msg.sender and allowed is not None and msg.sender not in allowed:
        raise RefusedError(
            f"{msg.op} is not for a {msg.sender}: only {', '.join(sorted(allowed))} may send it",
            code="forbidden",
        )


SHARD_LOST = 3
"""The scheduler's exit code when a shard is lost: its server died with no synced backup (the
launcher then does not restart the scheduler: the job goes back to its checkpoint)."""
DEMOTED = 3
"""A server's exit code when its shard is served by another now (it was thought dead)."""


def error(request: Message | int, code: str, message: str) -> Message:
    """An ``error`` reply to ``request`` (a message or a request id)."""
    rid = request if isinstance(request, int) else request.id
    return Message("error", id=rid, body={"code": code, "message": message})


def field(msg: Message, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``msg.body[name]`` if it has type ``kind``; ProtocolError naming the field if not."""
    if name not in msg.body:
        if default is ...:
            raise ProtocolError(f"{msg.op}: missing field {name!r}")
        return default
    value = msg.body[name]
    if isinstance(value, bool) and kind is not bool and bool not in _tuple(kind):
        raise ProtocolError(f"{msg.op}: field {name!r} must not be a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(f"{msg.op}: field {name!r} has type {type(value).__name__}")
    return value


MAX_SCALARS = 64

READ_AHEAD = 64
"""The furthest past its version that a server lets a reader's ``read`` wait (BSP)."""


def scalars(raw: dict[str, Any]) -> dict[str, float]:
    """Validated scalars (e.g. a worker's loss): at most MAX_SCALARS, short names, finite
    numbers."""
    if len(raw) > MAX_SCALARS:
        raise ProtocolError(f"at most {MAX_SCALARS} scalars")
    out = {}
    for name, value in raw.items():
        if not (isinstance(name, str) and 0 < len(name) <= 64):
            raise ProtocolError("scalar names are strings of 1 to 64 characters")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"scalar {name!r} is not a number")
        if not math.isfinite(value):  # one nan would reach every worker's mean
            raise ProtocolError(f"scalar {name!r} is not finite")
        out[name] = float(value)
    return out


PULL_CODECS = ("none", "bf16", "fp16")
"""The codecs replies of parameters may be encoded with (``pslm.wire.codecs``: casts)."""


def pull_codec(name: str) -> str:
    """``name`` if pulls take that codec; RefusedError (``bad_codec``) if not."""
    if name not in PULL_CODECS:
        raise RefusedError(f"pulls take {', '.join(PULL_CODECS)}, not {name!r}", code="bad_codec")
    return name


def ints(raw: list[Any], limit: int = 1 << 16) -> list[int]:
    """``raw`` if it is a list of at most ``limit`` integers; ProtocolError if not."""
    if len(raw) > limit or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        raise ProtocolError(f"expected a list of at most {limit} integers")
    return list(raw)


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
