"""One server's shard: its chunks in one flat fp32 buffer, the optimizer state beside it.

    store = ShardStore(keyspace, server=0, optimizer=cfg)
    store.load(values)                          # initial values, one tensor per chunk
    grads, factor = store.reduce([(1.0, push_a), (1.0, push_b)])  # mean = grads * factor
    sq = store.sq_norm(grads) * factor**2       # this shard's part of the squared mean norm
    store.apply(grads, factor * clip_coef(global_sq, cfg.clip_norm))  # one step; version += 1

The mean's factor and the clipping coefficient are not applied in separate passes: the fused
optimizer kernels divide by them as they read each gradient (their ``grad_scale``), which saves
two passes over the shard's memory.

The store knows tensors and keys, never models. It does no I/O and takes no locks: the server's
request loop owns it. Every list of per-chunk tensors is in the shard order of
``KeySpace.shard``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from pslm.errors import RefusedError
from pslm.ps.keyspace import KeySpace
from pslm.ps.optim import OptimizerConfig, build_rule

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def clip_coef(sq_norm: float, max_norm: float) -> float:
    """The factor ``clip_grad_norm_`` multiplies gradients by, from the global squared norm."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(sq_norm) + 1e-6))


class ShardStore:
    """Parameters and optimizer state of the chunks one server holds."""

    def __init__(self, keyspace: KeySpace, server: int, optimizer: OptimizerConfig):
        self.keyspace = keyspace
        self.server = server
        self.optimizer = optimizer
        self.chunks = keyspace.shard(server)
        self.lengths = [c.length for c in self.chunks]
        self.position = {c.key: i for i, c in enumerate(self.chunks)}
        n = sum(self.lengths)
        self.params = torch.empty(0)
        self.views: list[torch.Tensor] = []
        self.packed: list[torch.Tensor] = []
        self._bind(torch.zeros(n, dtype=torch.float32))
        self.n_decay = sum(1 for c in self.chunks if keyspace.tensors[c.tensor].decay)
        self.rule = build_rule(optimizer)
        self.state = {name: torch.zeros(n) for name in self.rule.state_names}
        self.state_views = {k: list(v.split(self.lengths)) for k, v in self.state.items()}
        # one step counter per chunk: the fused kernels increment each one they are given
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in self.chunks]
        self._grad = torch.empty(0)
        self.version = 0
        """Number of updates applied."""

    def relocate_params(self) -> None:
        """Move the parameters to new memory (the old stays valid for whoever still reads it)."""
        self._bind(self.params.clone())

    def _bind(self, params: torch.Tensor) -> None:
        self.params = params
        self.views = list(params.split(self.lengths))
        starts = [0]
        for length in self.lengths:
            starts.append(starts[-1] + length)
        pieces = self.keyspace.pieces(self.server)
        # what a message carries: views of the flat buffer, one per piece
        self.packed = [params[starts[lo] : starts[hi]] for lo, hi in pieces]

    @property
    def numel(self) -> int:
        return self.params.numel()

    def unpack(self, pieces: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
        """One view per chunk (shard order) of ``pieces``, the tensors of a message.

        Refused unless there is one 1-D float tensor per piece (``KeySpace.pieces``) of the
        piece's size; nothing is copied.
        """
        layout = self.keyspace.pieces(self.server)
        if len(pieces) != len(layout):
            raise RefusedError(
                f"{what} has {len(pieces)} tensors, server {self.server} takes {len(layout)} "
                f"pieces ({len(self.chunks)} chunks)",
                code="bad_shape",
            )
        views: list[torch.Tensor] = []
        for i, (t, (lo, hi)) in enumerate(zip(pieces, layout, strict=True)):
            n = sum(self.lengths[lo:hi])
            if t.dtype not in GRAD_DTYPES or t.dim() != 1 or t.numel() != n:
                names = sorted({self._name(k) for k in range(lo, hi)})
                raise RefusedError(
                    f"{what} tensor {i} (chunks of {', '.join(map(repr, names[:3]))}) is "
                    f"{t.dtype} {list(t.shape)}, expected a float tensor of shape [{n}]",
                    code="bad_shape",
                )
            views.extend(t.split(self.lengths[lo:hi]) if hi - lo > 1 else [t])
        return views

    def _name(self, position: int) -> str:
        return self.keyspace.tensors[self.chunks[position].tensor].name

    def load(self, values: Sequence[torch.Tensor]) -> None:
        """Set the parameters from the pieces of an init message (checked first)."""
        for view, v in zip(self.views, self.unpack(values, "init"), strict=True):
            view.copy_(v)

    def save(self, path: Path) -> int:
        """Write parameters, optimizer state and step counters to ``path`` (safetensors),
        atomically (temporary file, fsync, rename); returns the file's size."""
        tensors = {
            "params": self.params,
            "steps": torch.stack(self.steps) if self.steps else torch.zeros(0),
        }
        tensors.update({f"state.{k}": v for k, v in self.state.items()})
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

    def add_delta(self, deltas: Sequence[torch.Tensor], multiplier: float = 1.0) -> None:
        """Local SGD's update: add ``deltas * multiplier`` (the workers' mean change)."""
        for view, delta in zip(self.views, deltas, strict=True):
            view.add_(delta, alpha=multiplier)
        self.version += 1

    def reduce(
        self, pushes: Sequence[tuple[float, Sequence[torch.Tensor]]]
    ) -> tuple[list[torch.Tensor], float]:
        """The weighted sum of the pushes' gradients per chunk, and the factor that makes it the
        weighted mean.

        ``pushes`` are (weight, per-chunk tensors), in a fixed order (worker rank), so the sum
        is the same from run to run. A single fp32 push is used as it is, without a copy.
        Equal weights sum the gradients unweighted (factor 1/W), so two equal pushes give
        exactly (a + b) * 0.5.
        """
        (w0, g0), rest = pushes[0], pushes[1:]
        equal = all(w == w0 for w, _ in pushes)
        factor = 1.0 / len(pushes) if equal else 1.0 / sum(w for w, _ in pushes)
        if not rest and all(g.dtype == torch.float32 for g in g0):
            return list(g0), factor
        if self._grad.numel() != self.numel:
            self._grad = torch.empty(self.numel)
        out = list(self._grad.split(self.lengths))
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
        return out, factor

    @staticmethod
    def sq_norm(grads: Sequence[torch.Tensor]) -> float:
        """Sum of squares of ``grads``: fp32 norms per chunk (as ``clip_grad_norm_`` takes per
        tensor, so a huge gradient overflows to inf the same way), squared and summed in
        float64."""
        return sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads)

    def apply(
        self, grads: Sequence[torch.Tensor], multiplier: float = 1.0, step: int | None = None
    ) -> None:
        """One optimizer step with ``grads * multiplier`` at the schedule's learning rate for
        ``step`` (default: the version, as under BSP; asynchronous updates give the pushing
        worker's clock). The kernels overwrite ``grads`` with the multiplied values.
        """
        lr = self.optimizer.lr_at(self.version if step is None else step)
        # the kernels divide by grad_scale; a 0 multiplier (clipping an infinite norm) zeroes
        # finite gradients, as clip_grad_norm_'s factor of 0 does
        scale = (
            None
            if multiplier == 1.0
            else torch.tensor(1.0 / multiplier if multiplier else math.inf)
        )
        d = self.n_decay
        for lo, hi, wd in ((0, d, self.optimizer.weight_decay), (d, len(self.chunks), 0.0)):
            if lo == hi:
                continue
            self.rule.step(
                self.views[lo:hi],
                list(grads[lo:hi]),
                {k: v[lo:hi] for k, v in self.state_views.items()},
                self.steps[lo:hi],
                lr=lr,
                weight_decay=wd,
                grad_scale=scale,
            )
        self.version += 1
