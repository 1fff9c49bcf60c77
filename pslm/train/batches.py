"""The shares of a global batch: which rows each is, and the embedding rows its push names.

    batches = ShareBatches(task, keeper, batch_size=16, steps=1200, row_name=None)
    x, y = batches.batch(step, share)      # share's rows of the global batch of step
    weight = batches.weight(share)         # how many rows: the share's weight in the mean
    rows = batches.row_selection(step, x)  # with untied embeddings, else None

A global batch is cut into one share per worker (``pslm.lm.data.worker_slice``); a worker
trains the shares it holds (``ShareKeeper.mine``), its own unless a worker died.
"""

from __future__ import annotations

import torch

from pslm.lm.data import worker_slice
from pslm.train.shares import ShareKeeper
from pslm.train.tasks import Task


class ShareBatches:
    """The task's batches, cut into shares. ``row_name``: the token embedding, when it travels
    by rows (untied embeddings), else None."""

    def __init__(
        self,
        task: Task,
        keeper: ShareKeeper,
        *,
        batch_size: int,
        steps: int,
        row_name: str | None,
    ):
        self.task = task
        self.keeper = keeper
        self.batch_size = batch_size
        self.steps = steps
        self.row_name = row_name

    def rows(self, share: int) -> tuple[int, int]:
        """The rows of every global batch that make up ``share``."""
        return worker_slice(share, self.keeper.num_shares, self.batch_size)

    def weight(self, share: int) -> int:
        lo, hi = self.rows(share)
        return hi - lo

    def batch(self, step: int, share: int) -> tuple[torch.Tensor, ...]:
        """``share``'s rows of the global batch of ``step``: the model's inputs (token ids
        first) and targets."""
        lo, hi = self.rows(share)
        return self.task.batch(step, lo, hi)

    def row_selection(
        self, step: int, x: torch.Tensor, share: int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """With untied embeddings: the embedding rows this step pushes (its batch's tokens) and
        the rows the next step reads (the next batch's tokens of ``share``, or of every share
        held), to come back after the update."""
        if self.row_name is None:
            return None
        if step + 1 < self.steps:
            mine = self.keeper.mine if share is None else [share]
            upcoming = torch.cat([self.batch(step + 1, s)[0].reshape(-1) for s in mine]).unique()
        else:
            upcoming = torch.zeros(0, dtype=torch.long)
        return {self.row_name: (x.unique().cpu(), upcoming.cpu())}
