"""One server's shard: its chunks in one flat fp32 buffer, the optimizer state beside it.

    store = ShardStore(keyspace, server=0, optimizer=cfg)
    store.load(values)                          # initial values, one tensor per chunk
    grads, factor = store.reduce([(1.0, push_a), (1.0, push_b)])  # mean = grads * factor
    sq = store.sq_norm(grads) * factor**2       # this shard's part of the squared mean norm
    store.apply(grads, factor * clip_coef(global_sq, cfg.clip_norm))  # one step; version += 1

The mean's factor and the clipping coefficient are not applied in separate passes: the fused
optimizer kernels divide by them as they read each gradient (their ``grad_scale``), which saves
two passes over the shard's memory.

Row tensors (``KeySpace``: an untied embedding) are pushed as ``RowGrad``s, the rows a batch
touched and their gradients, and updated lazily with SparseAdam's rule: only those rows'
parameters and moments change, each chunk's step counter advancing every update.

The store knows tensors and keys, never models. It does no I/O and takes no locks: the server's
request loop owns it. Every list of per-chunk tensors is in the shard order of
``KeySpace.shard``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pslm.errors import ConfigError, RefusedError
from pslm.ps.core.keyspace import KeySpace
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.server.rules import build_rule
from pslm.wire.message import encode_tensors

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RowGrad(NamedTuple):
    """The gradient of some rows of a row chunk."""

    rows: torch.Tensor
    """Row numbers within the chunk: int64, sorted, unique."""
    values: torch.Tensor
    """Their gradients, (len(rows), row width) fp32."""


Grad = torch.Tensor | RowGrad
"""A chunk's gradient: the whole chunk (dense, 1-D) or some of its rows (row chunks)."""


def clip_coef(sq_norm: float, max_norm: float) -> float:
    """The factor ``clip_grad_norm_`` multiplies gradients by, from the global squared norm:
    NaN for a NaN norm, as torch's clamp gives (every gradient becomes NaN, not unclipped)."""
    if max_norm <= 0:
        return 1.0
    coef = max_norm / (math.sqrt(sq_norm) + 1e-6)
    return coef if math.isnan(coef) else min(1.0, coef)


def check_fits(
    keyspace: KeySpace, server: int, optimizer: OptimizerConfig, *, spare: int = 0
) -> None:
    """RefusedError (``too_large``) unless ``server``'s shard of ``keyspace`` - parameters,
    optimizer state and a gradient buffer, fp32 - fits in the memory this machine has free
    (a key space comes from a peer: it must not make the server allocate what it lacks)."""
    numel = sum(c.length for c in keyspace.shard(server))
    need = numel * 4 * (2 + len(build_rule(optimizer).state_names))
    free = available_memory() + spare
    if need > free:
        raise RefusedError(
            f"server {server}'s shard would need {need / 2**30:.2f} GiB ({numel:,} parameters "
            f"with {optimizer.name}'s state); {free / 2**30:.2f} GiB is free here: use more "
            f"servers or a smaller model",
            code="too_large",
        )


def available_memory() -> int:
    """Bytes of memory free for a new shard: the kernel's MemAvailable where it says, else the
    physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class _Group:
    """Dense chunks [lo, hi) updated in one kernel call: views of their parameters, state
    and step counters (``counts``: the counters as one tensor)."""

    lo: int
    hi: int
    decayed: bool
    counts: torch.Tensor
    params: list[torch.Tensor]
    state: dict[str, list[torch.Tensor]]
    steps: list[torch.Tensor]


class StagedUpdate:
    """One optimizer step over a shard's dense chunks, taken in stages (``ShardStore.update``):
    a server answers each reply as soon as the chunks it carries are updated, while the rest
    are being updated and ZeroMQ sends the earlier replies."""

    def __init__(
        self, store: ShardStore, grads: Sequence[Grad], lr: float, scale: torch.Tensor | None
    ):
        self.store = store
        self.grads = grads
        self.lr = lr
        self.scale = scale
        self.done = [False] * store.n_dense

    def span(self, lo: int, hi: int) -> None:
        """Update the dense chunks in [lo, hi) not updated yet (each exactly once)."""
        hi = min(hi, self.store.n_dense)
        k = lo
        while k < hi:
            if self.done[k]:
                k += 1
                continue
            end = k
            while end < hi and not self.done[end]:
                self.done[end] = True
                end += 1
            self.store._step_chunks(self.grads, k, end, self.lr, self.scale)
            k = end

    def finish(self) -> None:
        """The chunks not updated yet, then the version: the step is complete."""
        self.span(0, self.store.n_dense)
        self.store.version += 1


class ShardStore:
    """Parameters and optimizer state of the chunks one server holds."""

    def __init__(
        self, keyspace: KeySpace, server: int, optimizer: OptimizerConfig, *, replaces: int = 0
    ):
        """``replaces``: bytes of a store this one is to replace (a backup's new copy), which
        count as free."""
        # (a peer's key space: checked before any allocation)
        check_fits(keyspace, server, optimizer, spare=replaces)
        self.keyspace = keyspace
        self.server = server
        self.optimizer = optimizer
        self.base_optimizer = optimizer
        """As configured, before live settings (``override``)."""
        self.chunks = keyspace.shard(server)
        self.lengths = [c.length for c in self.chunks]
        self.position = {c.key: i for i, c in enumerate(self.chunks)}
        self.n_dense = keyspace.dense(server)
        """Dense chunks come first; the chunks of row tensors follow them."""
        self.widths = [keyspace.tensors[c.tensor].row_width for c in self.chunks]
        n = sum(self.lengths)
        self.params = torch.empty(0)
        self.views: list[torch.Tensor] = []
        self.packed: list[torch.Tensor] = []
        self._bind(torch.zeros(n, dtype=torch.float32))
        self.n_decay = sum(1 for c in self.chunks if keyspace.tensors[c.tensor].decay)
        if keyspace.row_tensors() and optimizer.name == "sgd":
            raise ConfigError("row tensors are updated with (lazy) Adam: use adam or adamw")
        self.rule = build_rule(optimizer)
        self.state = {name: torch.zeros(n) for name in self.rule.state_names}
        self.state_views = {k: list(v.split(self.lengths)) for k, v in self.state.items()}
        # one step counter per chunk (0-d views of one buffer: a group is counted in one op)
        self.step_counts = torch.zeros(len(self.chunks), dtype=torch.float32)
        self.steps = list(self.step_counts.unbind())
        self._grad = torch.empty(0)
        self.version = 0
        """Number of updates applied."""
        self._groups: list[_Group] | None = None

    def relocate_params(self) -> None:
        """Move the parameters to new memory (the old stays valid for whoever still reads it)."""
        self._bind(self.params.clone())

    def _bind(self, params: torch.Tensor) -> None:
        self.params = params
        self.views = list(params.split(self.lengths))
        starts = [0]
        for length in self.lengths:
            starts.append(starts[-1] + length)
        self.starts = starts
        """Where each chunk begins in the flat buffer (and where the last one ends)."""
        pieces = self.keyspace.pieces(self.server)
        # what a message carries: views of the flat buffer, one per piece, then the row chunks
        self.packed = [params[starts[lo] : starts[hi]] for lo, hi in pieces]
        self.packed_wire = encode_tensors(self.packed[: len(pieces)])
        """The dense pieces as a reply carries them (``Message.wire``), made once."""
        self.packed += self.views[self.n_dense :]
        self._groups = None

    @property
    def numel(self) -> int:
        return self.params.numel()

    @property
    def nbytes(self) -> int:
        """Memory the store holds: parameters, optimizer state, gradient buffer."""
        held = [self.params, self._grad, *self.state.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def unpack(self, pieces: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
        """One view per dense chunk (shard order) of ``pieces``, the tensors of a message.

        Refused unless there is one 1-D float tensor per piece (``KeySpace.pieces``) of the
        piece's size; nothing is copied.
        """
        layout = self.keyspace.pieces(self.server)
        if len(pieces) != len(layout):
            raise RefusedError(
                f"{what} has {len(pieces)} tensors, server {self.server} takes {len(layout)} "
                f"pieces ({self.n_dense} dense chunks)",
                code="bad_shape",
            )
        views: list[torch.Tensor] = []
        for i, (t, (lo, hi)) in enumerate(zip(pieces, layout, strict=True)):
            self.check_chunk(t, lo, what, length=sum(self.lengths[lo:hi]), tensor=i)
            views.extend(t.split(self.lengths[lo:hi]) if hi - lo > 1 else [t])
        return views

    def check_chunk(
        self, t: torch.Tensor, position: int, what: str, *, length: int = 0, tensor: int = 0
    ) -> None:
        """Refuse ``t`` unless it is a 1-D float tensor of the chunk's (or ``length``)
        elements."""
        n = length or self.lengths[position]
        if t.dtype not in GRAD_DTYPES or t.dim() != 1 or t.numel() != n:
            raise RefusedError(
                f"{what} tensor {tensor} (for {self._name(position)!r}) is "
                f"{t.dtype} {list(t.shape)}, expected a float tensor of shape [{n}]",
                code="bad_shape",
            )

    def check_rows(self, rows: torch.Tensor, position: int, what: str) -> torch.Tensor:
        """``rows`` as int64 row numbers of the row chunk at ``position``; refused unless a
        1-D integer tensor of sorted, unique rows within the chunk."""
        if position < self.n_dense:
            raise RefusedError(f"{what}: {self._name(position)!r} is not a row tensor")
        n_rows = self.lengths[position] // self.widths[position]
        ok = rows.dtype in (torch.int32, torch.int64) and rows.dim() == 1
        if ok and rows.numel():
            r = rows.long()
            ok = int(r[0]) >= 0 and int(r[-1]) < n_rows and bool((r[1:] > r[:-1]).all())
        if not ok:
            raise RefusedError(
                f"{what}: rows of {self._name(position)!r} must be sorted unique integers in "
                f"[0, {n_rows})",
                code="bad_shape",
            )
        return rows.long()

    def span(self, lo: int, hi: int) -> torch.Tensor:
        """The parameters of chunks [lo, hi) (consecutive positions): one view."""
        return self.params[self.starts[lo] : self.starts[hi]]

    def row_grad(self, rows: torch.Tensor, values: torch.Tensor, position: int) -> RowGrad:
        """A RowGrad of checked ``rows`` and ``values`` (refused unless they match)."""
        r = self.check_rows(rows, position, "push")
        w = self.widths[position]
        if values.dtype not in GRAD_DTYPES or values.dim() != 1 or values.numel() != len(r) * w:
            raise RefusedError(
                f"push: {len(r)} rows of {self._name(position)!r} need {len(r) * w} float "
                f"values, got {values.dtype} {list(values.shape)}",
                code="bad_shape",
            )
        return RowGrad(r, values.view(len(r), w).float())

    def rows_of(self, position: int, rows: torch.Tensor) -> torch.Tensor:
        """The current values of ``rows`` (checked) of the row chunk at ``position``, 1-D."""
        r = self.check_rows(rows, position, "pull")
        w = self.widths[position]
        return self.views[position].view(-1, w).index_select(0, r).view(-1)

    def _name(self, position: int) -> str:
        return self.keyspace.tensors[self.chunks[position].tensor].name

    def unpack_all(self, tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
        """One view per chunk of a message carrying the whole shard: the dense pieces, then
        each row chunk whole (``packed``)."""
        n_pieces = len(self.keyspace.pieces(self.server))
        if len(tensors) != n_pieces + len(self.chunks) - self.n_dense:
            raise RefusedError(
                f"{what} has {len(tensors)} tensors, server {self.server} takes "
                f"{n_pieces + len(self.chunks) - self.n_dense}",
                code="bad_shape",
            )
        views = self.unpack(tensors[:n_pieces], what)
        for i, t in enumerate(tensors[n_pieces:]):
            self.check_chunk(t, self.n_dense + i, what, tensor=n_pieces + i)
            views.append(t)
        return views

    def load(self, values: Sequence[torch.Tensor]) -> None:
        """Set the parameters from the tensors of an init message (checked first)."""
        for view, v in zip(self.views, self.unpack_all(values, "init"), strict=True):
            view.copy_(v)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the shard holds but its version: ``params``, ``steps`` (the step
        counters), ``state.<name>`` (optimizer state). Live views, not copies."""
        tensors = {
            "params": self.params,
            "steps": torch.stack(self.steps) if self.steps else torch.zeros(0),
        }
        tensors.update({f"state.{k}": v for k, v in self.state.items()})
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor], version: int, what: str) -> None:
        """Take what ``state_tensors`` gave (of a store of the same key space and optimizer)
        and ``version``; RefusedError, nothing changed, unless every tensor is there with its
        shape and dtype."""
        want = {k: tuple(t.shape) for k, t in self.state_tensors().items()}
        got = {k: tuple(t.shape) for k, t in tensors.items()}
        if got != want or any(t.dtype != torch.float32 for t in tensors.values()):
            raise RefusedError(
                f"{what} holds {got}, expected fp32 tensors {want}", code="bad_shape"
            )
        if version < 0:
            raise RefusedError(f"{what}: version {version} is negative", code="bad_shape")
        self.params.copy_(tensors["params"])
        for step, saved in zip(self.steps, tensors["steps"], strict=True):
            step.fill_(saved)
        for k, buf in self.state.items():
            buf.copy_(tensors[f"state.{k}"])
        self.version = version

    def save(self, path: Path) -> int:
        """Write parameters, optimizer state and step counters to ``path`` (safetensors),
        atomically (temporary file, fsync, rename); returns the file's size."""
        tensors = self.state_tensors()
        meta = {
            "keyspace": json.dumps(self.keyspace.to_dict()),
            "optimizer": json.dumps(self.optimizer.to_dict()),
            "server": str(self.server),
            "version": str(self.version),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path.stat().st_size

    def restore(self, path: Path) -> None:
        """Load what ``save`` wrote: parameters, optimizer state, step counters, version.

        ConfigError (nothing changed) unless the file holds this server's shard of the same
        key space, saved with an optimizer of the same kind (its settings may differ: they
        are the ones given now).
        """
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"cannot read shard {path}: {exc}") from None
        try:
            saved_ks = KeySpace.from_dict(json.loads(meta["keyspace"]))
            saved_opt = json.loads(meta["optimizer"])
            server, version = int(meta["server"]), int(meta["version"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"shard {path} has no usable metadata: {exc!r}") from None
        if saved_ks.fingerprint() != self.keyspace.fingerprint() or server != self.server:
            raise ConfigError(f"shard {path} is not server {self.server}'s shard of this model")
        if not isinstance(saved_opt, dict) or saved_opt.get("name") != self.optimizer.name:
            raise ConfigError(f"shard {path} was trained with another optimizer")
        try:
            self.load_state(tensors, version, f"shard {path}")
        except RefusedError as exc:
            raise ConfigError(str(exc)) from None

    def skip(self) -> None:
        """An update that changes nothing but the version (a skipped clock: its gradient was
        not finite). The step counters stay, as an optimizer step AMP skips leaves them."""
        self.version += 1

    def add_delta(self, deltas: Sequence[Grad], multiplier: float = 1.0) -> None:
        """Local SGD's update: add ``deltas * multiplier`` (the workers' mean change)."""
        for view, delta in zip(self.views, deltas, strict=True):
            view.add_(_dense(delta), alpha=multiplier)
        self.version += 1

    def reduce(self, pushes: Sequence[tuple[float, Sequence[Grad]]]) -> tuple[list[Grad], float]:
        """The weighted sum of the pushes' gradients per chunk, and the factor that makes it the
        weighted mean.

        ``pushes`` are (weight, per-chunk gradients), in a fixed order (worker rank), so the
        sum is the same from run to run. A single fp32 push is used as it is, without a copy.
        Equal weights sum the gradients unweighted (factor 1/W), so two equal pushes give
        exactly (a + b) * 0.5. Row chunks sum over the union of the rows pushed.
        """
        w0 = pushes[0][0]
        equal = all(w == w0 for w, _ in pushes)
        factor = 1.0 / len(pushes) if equal else 1.0 / sum(w for w, _ in pushes)
        rows: list[Grad] = [
            self._reduce_rows([(w, _rows(g[k])) for w, g in pushes], k, equal)
            for k in range(self.n_dense, len(self.chunks))
        ]
        dense = [(w, [_dense(x) for x in g[: self.n_dense]]) for w, g in pushes]
        return [*self._reduce_dense(dense, equal), *rows], factor

    def _reduce_rows(self, grads: list[tuple[float, RowGrad]], k: int, equal: bool) -> RowGrad:
        if len(grads) == 1:
            return grads[0][1]
        union = torch.cat([g.rows for _, g in grads]).unique(sorted=True)
        acc = torch.zeros(len(union), self.widths[k])
        for w, g in grads:
            acc.index_add_(
                0, torch.searchsorted(union, g.rows), g.values, alpha=1.0 if equal else w
            )
        return RowGrad(union, acc)

    def _reduce_dense(
        self, pushes: list[tuple[float, list[torch.Tensor]]], equal: bool
    ) -> list[torch.Tensor]:
        (w0, g0), rest = pushes[0], pushes[1:]
        if not rest and all(g.dtype == torch.float32 for g in g0):
            return list(g0)
        n = sum(self.lengths[: self.n_dense])
        if self._grad.numel() != n:
            self._grad = torch.empty(n)
        out = list(self._grad.split(self.lengths[: self.n_dense]))
        fp32 = all(g.dtype == torch.float32 for _, push in pushes for g in push)
        for k, acc in enumerate(out):
            if equal and rest and fp32:  # one pass for the common case
                torch.add(g0[k], rest[0][1][k], out=acc)
                others: Sequence[tuple[float, Sequence[torch.Tensor]]] = rest[1:]
            else:  # half-precision pushes are summed in fp32, after the copy
                acc.copy_(g0[k])
                if not equal:
                    acc.mul_(w0)
                others = rest
            for w, g in others:
                acc.add_(g[k], alpha=1.0 if equal else w)
        return out

    @staticmethod
    def sq_norm(grads: Sequence[Grad]) -> float:
        """Sum of squares of ``grads``: fp32 norms per chunk (as ``clip_grad_norm_`` takes per
        tensor, so a huge gradient overflows to inf the same way), squared and summed in
        float64."""
        return sum(
            float(torch.linalg.vector_norm(g.values if isinstance(g, RowGrad) else g)) ** 2
            for g in grads
        )

    def override(self, settings: dict[str, float]) -> dict[str, float]:
        """Put live settings (lr, clip_norm, weight_decay: all in force, as ``pslm ctl`` set
        them) on the configured optimizer for the updates to come; returns what changed."""
        new = self.base_optimizer.steered(settings)
        changed = {k: v for k, v in settings.items() if getattr(self.optimizer, k) != v}
        self.optimizer = new
        return changed

    def apply(
        self, grads: Sequence[Grad], multiplier: float = 1.0, step: int | None = None
    ) -> None:
        """One optimizer step with ``grads * multiplier`` at the schedule's learning rate for
        ``step`` (default: the version, as under BSP; asynchronous updates give the pushing
        worker's clock). The kernels overwrite ``grads`` with the multiplied values.
        """
        self.update(grads, multiplier, step).finish()

    def update(
        self, grads: Sequence[Grad], multiplier: float = 1.0, step: int | None = None
    ) -> StagedUpdate:
        """``apply``'s step taken in stages: row chunks now, dense chunks as ``StagedUpdate.span``
        asks for them, the rest and the version with ``StagedUpdate.finish``. The kernels are
        elementwise, so the stages change nothing in the result."""
        lr = self.optimizer.lr_at(self.version if step is None else step)
        for k in range(self.n_dense, len(self.chunks)):
            g = grads[k]
            assert isinstance(g, RowGrad)
            self._lazy_adam(k, g, multiplier, lr)
        # the kernels divide by grad_scale; a 0 multiplier (clipping an infinite norm) zeroes
        # finite gradients, as clip_grad_norm_'s factor of 0 does
        scale = (
            None
            if multiplier == 1.0
            else torch.tensor(1.0 / multiplier if multiplier else math.inf)
        )
        return StagedUpdate(self, grads, lr, scale)

    def _step_chunks(
        self, grads: Sequence[Grad], lo: int, hi: int, lr: float, scale: torch.Tensor | None
    ) -> None:
        """The optimizer over dense chunks [lo, hi), one kernel call per decay group."""
        for group in self._dense_groups():
            a, b = max(lo, group.lo) - group.lo, min(hi, group.hi) - group.lo
            if a >= b:
                continue
            whole = a == 0 and b == group.hi - group.lo
            (group.counts if whole else group.counts[a:b]).add_(1)  # this update's step number
            self.rule.step(
                group.params if whole else group.params[a:b],
                [_dense(x) for x in grads[group.lo + a : group.lo + b]],
                group.state if whole else {k: v[a:b] for k, v in group.state.items()},
                group.steps if whole else group.steps[a:b],
                lr=lr,
                weight_decay=self.optimizer.weight_decay if group.decayed else 0.0,
                grad_scale=scale,
            )

    def _dense_groups(self) -> list[_Group]:
        """The dense chunks with weight decay, then those without, as the kernels take them
        (made once: they are on every update's path)."""
        if self._groups is None:
            d = self.n_decay
            self._groups = [
                _Group(
                    lo,
                    hi,
                    decayed,
                    self.step_counts[lo:hi],
                    self.views[lo:hi],
                    {k: v[lo:hi] for k, v in self.state_views.items()},
                    self.steps[lo:hi],
                )
                for lo, hi, decayed in ((0, d, True), (d, self.n_dense, False))
                if lo < hi
            ]
        return self._groups

    def _lazy_adam(self, k: int, grad: RowGrad, multiplier: float, lr: float) -> None:
        """SparseAdam's update of the rows in ``grad`` of row chunk ``k`` (its formula, step for
        step: moments and parameters of other rows stay as they are)."""
        step = self.steps[k]
        step.add_(1)
        if not len(grad.rows):
            return
        beta1, beta2 = self.optimizer.betas
        w = self.widths[k]
        rows, g = grad.rows, grad.values if multiplier == 1.0 else grad.values * multiplier
        exp_avg = self.state_views["exp_avg"][k].view(-1, w)
        exp_avg_sq = self.state_views["exp_avg_sq"][k].view(-1, w)
        old_avg, old_sq = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
        avg_update = g.sub(old_avg).mul_(1 - beta1)
        exp_avg.index_add_(0, rows, avg_update)
        sq_update = g.pow(2).sub_(old_sq).mul_(1 - beta2)
        exp_avg_sq.index_add_(0, rows, sq_update)
        numer = avg_update.add_(old_avg)
        denom = sq_update.add_(old_sq).sqrt_().add_(self.optimizer.eps)
        n = float(step)
        step_size = lr * math.sqrt(1 - beta2**n) / (1 - beta1**n)
        self.views[k].view(-1, w).index_add_(0, rows, -step_size * numer.div_(denom))


def _dense(g: Grad) -> torch.Tensor:
    assert isinstance(g, torch.Tensor), "a row gradient where a dense chunk belongs"
    return g


def _rows(g: Grad) -> RowGrad:
    assert isinstance(g, RowGrad), "a dense gradient where a row chunk belongs"
    return g
