"""What a server does with the requests on its shard: it carries out the decisions of push
intake (``intake``), the BSP round (``bsp``) and the SSP/ASP gate (``asynchronous``), and
answers (``replies``), replicating every update first (``replica``).

    service = ShardService(shard=0, num_workers=2, num_servers=2, replies=..., ...)
    service.state = ShardState.fresh(store, consistency, num_workers=2, clock=0)   # init
    service.push(peer, msg); service.pull(peer, msg); service.read(peer, msg)
    service.norm(msg); service.fence(msg)

BSP and local SGD gather a round per clock and apply it once complete; SSP and ASP apply each
push as it arrives. Which one runs is the state's consistency model, changed only by a fence.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from pslm.errors import ProtocolError, PSLMError, RefusedError, ShardFailed
from pslm.ps.core import protocol
from pslm.ps.core.consistency import Consistency, StalenessGate
from pslm.ps.core.push import (
    FINITE,
    NONFINITE_GRAD,
    SKIP_REASONS,
    SKIPPED,
    SKIPPED_PUSHES,
    PushHeader,
)
from pslm.ps.core.steering import IN_FORCE, SETTINGS, optimizer_settings
from pslm.ps.server.asynchronous import Fence, Reads, WaitingRead, fence_refusal
from pslm.ps.server.bsp import Norms, Round, Skipped
from pslm.ps.server.intake import (
    Due,
    Intake,
    Part,
    PendingPush,
    Refused,
    Replayed,
    Taken,
    decode_part,
)
from pslm.ps.server.replica import Replication, Update
from pslm.ps.server.replies import Replies, Reply, Selection
from pslm.ps.server.shard import clip_coef
from pslm.ps.server.state import ShardState
from pslm.wire.message import Message
from pslm.wire.transport import Connection

log = logging.getLogger("pslm.server")


class ShardService:
    """Pushes, pulls, reads, norms and fences on one shard. Single-threaded: the server's
    request loop owns it."""

    def __init__(
        self,
        *,
        shard: int,
        num_workers: int,
        num_servers: int,
        replies: Replies,
        replication: Replication,
        peers: dict[int, Connection],
    ):
        self.shard = shard
        self.num_workers = num_workers
        self.num_servers = num_servers
        self.replies = replies
        self.replication = replication
        self.peers = peers
        """The servers of the other shards (their parts of the norm go there)."""
        self._state: ShardState | None = None
        self.intake = Intake()
        self.round = Round()
        self.norms = Norms()
        self.after_update: list[Reply] = []
        """BSP: replies waiting for the round's update."""
        self.parked: list[tuple[bytes, Message, int, Selection]] = []
        """BSP: pulls and reads waiting for a version (peer, request, version, selection)."""
        self.reads = Reads()
        self.fence_at: Fence | None = None
        self.steered = 0.0
        """The version of the live settings in force (``pslm.ps.core.steering``)."""

    @property
    def state(self) -> ShardState:
        if self._state is None:
            raise RefusedError(
                "the server is not initialised yet: call init first", code="not_initialised"
            )
        return self._state

    @state.setter
    def state(self, state: ShardState) -> None:
        self._state = state

    @property
    def initialised(self) -> bool:
        return self._state is not None

    @property
    def asynchronous(self) -> bool:
        return self.state.consistency.asynchronous

    # --- push intake ------------------------------------------------------------------------

    def push(self, peer: bytes, msg: Message) -> None:
        """A push, or one part of it (``pslm.ps.server.intake``); applied once complete."""
        state = self.state
        store = state.store
        head = PushHeader.decode(msg, self.num_workers)
        part = decode_part(head, self.replies.shared.push(head, msg.tensors, store), store)
        asynchronous = self.asynchronous
        due = Due(
            clock=state.gate.clocks[head.share] if asynchronous else store.version,
            version=store.version,
            asynchronous=asynchronous,
            in_round=not asynchronous and head.share in self.round.pushes,
            needs_norm=asynchronous and store.optimizer.clip_norm > 0,
        )
        decision = self.intake.take(head, part, due, store)
        if isinstance(decision, Replayed):
            self._replayed(peer, msg, head, part, decision)
            return
        if decision.superseded is not None:
            self._supersede(head, decision.superseded)
        if isinstance(decision, Refused):
            raise decision.error
        self._taken(peer, msg, head, part, decision)

    def _taken(self, peer: bytes, msg: Message, head: PushHeader, part: Part, t: Taken) -> None:
        pending = t.pending
        if head.reply_params:
            pending.replies.append(Reply(part.priority, peer, msg, part.reply, head.share))
        elif self.asynchronous:  # once applied, on the backup too (_push_now)
            pending.acks.append((peer, msg))
        else:  # BSP: the worker keeps a copy to send again until its clock is applied
            self.replies.send(peer, msg.reply(version=self.state.store.version))
        if t.complete:
            self._complete(head.share, pending)

    def _supersede(self, head: PushHeader, dropped: PendingPush) -> None:
        """``head.worker`` pushes a share another worker had begun to push in parts: that one
        died and the share is this worker's now, pushed anew. What waits for the dead one's
        parts is refused."""
        share, worker = head.share, head.worker
        log.warning(
            "share %d's push for clock %d: worker %d's %d parts dropped, worker %d pushes it now",
            share,
            dropped.clock,
            dropped.worker,
            len(dropped.seqs),
            worker,
        )
        why = f"share {share}'s push for clock {dropped.clock} is worker {worker}'s now"
        for r in dropped.replies:
            self.replies.send(r.peer, protocol.error(r.msg, "superseded", why))
        for peer, msg in dropped.acks:
            self.replies.send(peer, protocol.error(msg, "superseded", why))

    def _replayed(
        self, peer: bytes, msg: Message, head: PushHeader, part: Part, seen: Replayed
    ) -> None:
        """Answer a message of a push taken already as the first was (exactly once)."""
        state = self.state
        store = state.store
        if seen.where == "applied":
            if not head.reply_params:
                self.replies.send(peer, msg.reply(version=store.version, duplicate=True))
            elif self.asynchronous:  # what a read at the next clock sees
                self.reads.wait(WaitingRead(peer, msg, head.clock + 1, part.reply))
                self._release_reads()
            else:  # the values after that update are these
                extra: dict[str, Any] = {"scalars": state.scalars, "held_s": 0.0}
                if state.by:
                    extra["by"] = state.by
                self.replies.params(peer, msg, part.reply, store, **extra)
        elif seen.where == "round":
            self._hold_or_ack(peer, msg, head, part, self.after_update)  # waits with the others
        else:
            assert seen.pending is not None
            acks = seen.pending.acks if self.asynchronous else None
            self._hold_or_ack(peer, msg, head, part, seen.pending.replies, acks)
        log.info(
            "share %d's push for clock %d (part %d) again: not taken twice",
            head.share,
            head.clock,
            head.seq,
        )

    def _hold_or_ack(
        self,
        peer: bytes,
        msg: Message,
        head: PushHeader,
        part: Part,
        replies: list[Reply],
        acks: list[tuple[bytes, Message]] | None = None,
    ) -> None:
        """A repeated message: answered with the others (``acks``: acknowledged with them)."""
        if head.reply_params:
            replies.append(Reply(part.priority, peer, msg, part.reply, head.share))
        elif acks is not None:
            acks.append((peer, msg))
        else:
            version = self.state.store.version
            self.replies.send(peer, msg.reply(version=version, duplicate=True))

    def _complete(self, share: int, push: PendingPush) -> None:
        """Every part of a share's push has arrived: apply it (SSP/ASP) or count it in."""
        replies = sorted(push.replies, key=lambda r: r.priority)
        if self.asynchronous:
            self._push_now(share, push, replies)
            return
        self.round.add(share, push, time.monotonic())
        self.after_update.extend(replies)
        self._advance()

    # --- reads ------------------------------------------------------------------------------

    def pull(self, peer: bytes, msg: Message, worker: int) -> None:
        """A worker's pull: at once, or once the version (BSP) or the gate (SSP/ASP) lets it."""
        state = self.state
        store = state.store
        min_version = protocol.field(msg, "min_version", int, 0)
        keys = protocol.field(msg, "keys", (list, type(None)), None)
        if keys is not None:
            bad = [
                k
                for k in keys
                if not isinstance(k, int) or isinstance(k, bool) or k not in store.position
            ]
            if bad or len(keys) > len(store.chunks):
                raise RefusedError(f"pull: keys not held by this server: {bad[:5]}", code="bad_key")
        selection = Selection.of_pull(store, keys)
        protocol.pull_codec(protocol.field(msg, "pull_codec", str, "none"))
        if self.asynchronous:
            clock = protocol.field(msg, "clock", int, state.gate.clocks[worker])
            self.reads.wait(WaitingRead(peer, msg, clock, selection))
            self._release_reads()
            return
        if min_version > store.version + 1:
            raise RefusedError(
                f"pull for version {min_version}: the server is at {store.version} and only "
                "the next version can be waited for",
                code="bad_clock",
            )
        if min_version <= store.version:
            self.replies.params(peer, msg, selection, store)
        else:
            self.parked.append((peer, msg, min_version, selection))

    def read(self, peer: bytes, msg: Message) -> None:
        """A reader's request (a serving process, ``pslm.ps.client.reader``): chunks ``keys``
        whole (none: only the version), taking no part in training. Under BSP ``min_version``
        may ask for a version up to READ_AHEAD ahead, and the answer is sent as it is
        applied."""
        store = self.state.store
        keys = protocol.field(msg, "keys", list)
        if len(keys) > len(store.chunks) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k in store.position for k in keys
        ):
            raise RefusedError("read: keys not held by this server", code="bad_key")
        selection = Selection.of_pull(store, keys)
        min_version = protocol.field(msg, "min_version", int, 0)
        # a bad codec is refused now, not when the version comes
        protocol.pull_codec(protocol.field(msg, "pull_codec", str, "none"))
        synchronous = not self.asynchronous
        if not synchronous or min_version <= store.version:
            self.replies.params(peer, msg, selection, store, synchronous=synchronous)
        elif min_version <= store.version + protocol.READ_AHEAD:
            self.parked.append((peer, msg, min_version, selection))
        else:
            raise RefusedError(
                f"read for version {min_version}: the server is at {store.version}, and waits "
                f"for at most {protocol.READ_AHEAD} versions ahead",
                code="bad_clock",
            )

    # --- changing the consistency model -----------------------------------------------------

    def fence(self, msg: Message) -> Message:
        """The leading worker changes the consistency model (``pslm ctl set consistency``)
        from ``clock`` on (``pslm.ps.server.asynchronous``). The clock must lie beyond every
        read answered so far (under SSP the leader, stopped at its clock, picks one past the
        bound)."""
        state = self.state
        mode = Consistency.from_dict(protocol.field(msg, "consistency", dict))
        clock = protocol.field(msg, "clock", int)
        reached = self.reads.up_to if self.asynchronous else state.store.version
        refusal = fence_refusal(now=state.consistency, to=mode, clock=clock, reached=reached)
        if refusal is not None:
            raise refusal
        self.fence_at = Fence(clock, mode)
        log.info("switching from %s to %s at clock %d", state.consistency, mode, clock)
        return msg.reply(clock=clock)

    def _switch_if_due(self) -> dict[str, Any]:
        """Change the consistency model if the fence's clock is reached; returns what the
        replies sent now carry (``mode``), else nothing."""
        state = self.state
        fence = self.fence_at
        if fence is None:
            return {}
        at = state.gate.slowest if state.consistency.asynchronous else state.store.version
        if at < fence.clock:
            return {}
        self.fence_at = None
        was, state.consistency = state.consistency, fence.mode
        state.gate = StalenessGate(self.num_workers, fence.mode.bound)
        state.gate.clocks = [fence.clock] * self.num_workers
        if not fence.mode.asynchronous:
            state.store.version = fence.clock  # BSP: the version is the clock
            self.round = Round()
        self.reads.up_to = fence.clock - 1
        log.info("consistency model %s -> %s from clock %d", was, fence.mode, fence.clock)
        self.replication.sync(state)  # the backup takes the shard and the model whole
        return {"mode": fence.mode.to_dict()}

    # --- SSP and ASP: every push is an update -----------------------------------------------

    def _push_now(self, share: int, push: PendingPush, replies: list[Reply]) -> None:
        """Apply one share's push at once, then answer it: acknowledge its parts (only now:
        the worker keeps no copy, so an acknowledged push must be on the backup too), and
        with parameters once the gate lets its pusher read at the next clock. A push whose
        gradient is not finite (``FINITE``) passes its clock unapplied, and its reply says so."""
        state = self.state
        store = state.store
        self._steer(push.scalars, newest_only=True)  # (clipping may have changed)
        skip = push.scalars.get(FINITE, 1.0) < 1.0
        multiplier = 1.0  # the worker's own mean gradient, clipped by its own norm
        # (checked on arrival, unless live settings changed clipping: a worker yet to learn of
        # it sends none)
        if store.optimizer.clip_norm > 0 and push.sq_norm is not None and not skip:
            multiplier = clip_coef(push.sq_norm, store.optimizer.clip_norm)
        # half-precision pushes -> fp32
        fp32 = [] if skip else store.reduce([(1.0, push.complete_grads)])[0]
        steered = self._in_force() if self.replication.link is not None else {}
        update = Update(
            kind="async-skip" if skip else "async",
            version=store.version,
            multiplier=multiplier,
            grads=fp32,
            step=push.clock,
            share=share,
            scalars=steered,
        )
        if not self.replication.replicate(update, state):
            return  # no answer: the requests go to the shard's new server
        said = push.scalars
        if skip:
            log.warning(
                "share %d's push for clock %d skipped: %s",
                share,
                push.clock,
                SKIP_REASONS[NONFINITE_GRAD],
            )
            store.skip()
            state.skipped += 1
            said = {**push.scalars, SKIPPED: NONFINITE_GRAD}
        else:
            self.replies.writable(store)
            store.apply(fp32, multiplier, step=push.clock)
        state.gate.advance(share)
        for peer, msg in push.acks:
            self.replies.send(peer, msg.reply(version=store.version))
        for r in replies:
            self.reads.wait(WaitingRead(r.peer, r.msg, push.clock + 1, r.selection, said))
        self._release_reads()

    def _release_reads(self) -> None:
        """Answer every waiting read the staleness gate now lets through, each alone: one
        that fails is refused, the others are still answered (as ``_release_parked``)."""
        mode = self._switch_if_due()
        state = self.state
        for read in self.reads.due(state.gate, self.fence_at):
            staleness = state.gate.staleness(read.clock)
            extra: dict[str, Any] = {"staleness": staleness, **mode}
            if read.scalars is not None:  # with how many pushes were skipped so far
                extra["scalars"] = {**read.scalars, SKIPPED_PUSHES: float(state.skipped)}
            send = partial(
                self.replies.params, read.peer, read.msg, read.selection, state.store, **extra
            )
            if self.replies.alone(read.peer, read.msg, send):
                self.reads.answered(read, staleness)

    # --- BSP and local SGD: a round per clock -----------------------------------------------

    def norm(self, msg: Message) -> None:
        """Another server's part of the squared norm of a clock's mean gradient."""
        store = self.state.store
        server = protocol.field(msg, "server", int)
        clock = protocol.field(msg, "clock", int)
        sq = float(protocol.field(msg, "sq", (int, float)))
        if server == self.shard or not 0 <= server < self.num_servers:
            raise ProtocolError(f"norm from unknown server {server}")
        if sq < 0:  # inf and nan pass: a diverged model's norm, which every server must share
            raise ProtocolError(f"norm: negative squared norm {sq}")
        where = self.norms.place(server, clock, store.version)
        if where == "now":
            self.round.norms[server] = sq
            self._advance()
        elif where == "ahead":
            self.norms.ahead[server] = sq
        elif where == "old":
            log.debug("an old norm for clock %d from server %d (sent again)", clock, server)
        else:
            log.warning(
                "dropped a norm for clock %d from server %d (at %d)", clock, server, store.version
            )

    def send_norms(self, conn: Connection) -> None:
        """This shard's recent parts of the norm, to a server that may have missed them."""
        for clock, sq in self.state.norms.items() if self.initialised else ():
            self._send_norm(conn, clock, sq)

    def _send_norm(self, conn: Connection, clock: int, sq: float) -> None:
        try:
            conn.send(Message("norm", body={"server": self.shard, "clock": clock, "sq": sq}))
        except PSLMError as exc:  # the peer is gone: its successor gets it when it appears
            log.warning("could not send a norm: %s", exc)

    def _advance(self) -> None:
        """Apply the current clock's update if everything it needs has arrived."""
        state = self.state
        store, rnd = state.store, self.round
        if not rnd.full(self.num_workers):
            return
        local = state.consistency.kind == "local"
        scalars = rnd.mean_scalars()
        self._steer(scalars)  # the clock's live settings (the same on every server)
        clipped = store.optimizer.clip_norm > 0 and not local
        if rnd.grads is None and not rnd.flagged():
            grads, factor = store.reduce(rnd.ordered())
            sq = store.sq_norm(grads) * factor**2 if clipped else None
            rnd.reduced(grads, factor, self.shard, sq)
            if sq is not None:
                state.keep_norm(store.version, sq)
                for conn in self.peers.values():
                    self._send_norm(conn, store.version, sq)
        clip = store.optimizer.clip_norm if clipped else 0.0
        decision = rnd.ready(num_servers=self.num_servers, clip_norm=clip)
        if decision is None:
            return
        by = rnd.by(self.num_workers)
        if isinstance(decision, Skipped):
            scalars = {**scalars, SKIPPED: decision.code}
            log.warning("clock %d skipped: %s", store.version, SKIP_REASONS.get(decision.code, "?"))
            kind, multiplier, grads = "skip", 1.0, []
        else:
            kind, multiplier, grads = (
                "local" if local else "bsp",
                decision.multiplier,
                decision.grads,
            )
        update = Update(
            kind=kind,
            version=store.version,
            multiplier=multiplier,
            grads=grads,
            step=store.version,
            scalars=scalars,
            by=by,
            sq=state.norms.get(store.version, -1.0),
        )
        if not self.replication.replicate(update, state):
            return  # no answer: the requests go to the shard's new server
        self.replies.writable(store)
        replies = sorted(self.after_update, key=lambda r: r.priority)  # next forward's first
        self.after_update = []
        said = {"scalars": scalars, "by": by}
        sent = self._apply(update, replies, said)
        self.round = self.norms.next_round()
        state.scalars, state.by = scalars, by
        mode = self._switch_if_due()  # (the replies tell the workers)
        for r in replies[sent:]:
            self._answer_alone(r, rnd, version=store.version, **said, **mode)
        self._release_parked()

    def _apply(self, update: Update, replies: list[Reply], said: dict[str, Any]) -> int:
        """Apply a round's update, answering each reply as soon as its chunks are updated
        (unless a change of model waits for the whole update); returns how many went out."""
        store = self.state.store
        sent = 0
        try:
            if update.kind == "skip":
                store.skip()
                return 0
            if update.kind == "local":  # the pushes are parameter changes: average them in
                store.add_delta(update.grads, update.multiplier)
                return 0
            staged = store.update(update.grads, update.multiplier)
            if self.fence_at is None:
                for r in replies:
                    for lo, hi in r.selection.dense_spans(store):
                        staged.span(lo, hi)
                    self._answer_alone(r, self.round, version=store.version + 1, **said)
                    sent += 1
            staged.finish()
        except Exception as exc:  # (the kernels do not fail on checked input: a bug's way
            # out, not a path a push can take) some chunks may be stepped and others not
            log.exception("update for clock %d failed", store.version)
            raise ShardFailed(
                f"shard {self.shard}: the update for clock {store.version} failed part-way "
                f"({exc!r}); leaving, so that the shard is served from its backup"
            ) from exc
        return sent

    def _release_parked(self) -> None:
        """Answer the parked pulls and reads whose version is reached, each alone: one that
        fails is refused, the others are still answered. After a switch to SSP or ASP, which
        wait for no version, the reads parked ahead are answered now, as ``read`` answers
        them there (a pull asks for one version ahead at most: none is parked by then)."""
        store = self.state.store
        asynchronous = self.asynchronous
        parked, self.parked = self.parked, []
        for peer, msg, min_version, selection in parked:
            if min_version > store.version and not asynchronous:
                self.parked.append((peer, msg, min_version, selection))
                continue
            read = {"synchronous": not asynchronous} if msg.op == "read" else {}
            answer = partial(self.replies.params, peer, msg, selection, store, **read)
            self.replies.alone(peer, msg, answer)

    def _answer_alone(self, r: Reply, rnd: Round, **said: Any) -> None:
        """A push's reply with the parameters after its clock's update: the version, the
        clock's scalars and who pushed (``said``), and how long the server held the push; or,
        if that fails, a refusal of this one reply (the update goes on)."""
        held = round(time.monotonic() - rnd.arrived[r.share], 6)
        answer = partial(self.replies.params, r.peer, r.msg, r.selection, self.state.store)
        self.replies.alone(r.peer, r.msg, lambda: answer(held_s=held, **said))

    # --- live settings ----------------------------------------------------------------------

    def _steer(self, scalars: dict[str, float], *, newest_only: bool = False) -> None:
        """Put the live settings a push (SSP/ASP) or a clock (BSP) carries in force
        (``pslm.ps.core.steering``; SSP/ASP: only if no newer ones are)."""
        store = self.state.store
        version = scalars.get(IN_FORCE)
        if version is not None and not (newest_only and version < self.steered):
            changed = store.override(optimizer_settings(scalars))
            if changed:
                log.info("from version %d on: %s (live settings)", store.version, changed)
            self.steered = version

    def _in_force(self) -> dict[str, float]:
        """Scalars that describe the live settings in force, for the backup."""
        optimizer = self.state.store.optimizer
        return {f"min.{k}": float(getattr(optimizer, k)) for k in SETTINGS.values()}
