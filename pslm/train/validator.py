"""The validation loss a training run logs (``val_loss`` in metrics.jsonl).

    validator = Validator(client, keeper, task, iters=cfg.train.eval_iters)
    val_loss = validator.loss(step)                 # all workers, at a barrier
    val_loss = validator.loss(step, shared=False)   # this worker's view, alone

The batches are ``iters`` fixed validation batches (``task.val_batch``), the same at every
evaluation and in ``pslm eval``. Shared out, share s's batches are evaluated by whoever holds
share s, and a barrier adds up the sums, so the result does not depend on the workers.
"""

from __future__ import annotations

from pslm.ps.client.client import PSClient
from pslm.train.shares import ShareKeeper
from pslm.train.tasks import Task


class Validator:
    """Mean validation loss of the model as it stands."""

    def __init__(self, client: PSClient, keeper: ShareKeeper, task: Task, *, iters: int):
        self.client = client
        self.keeper = keeper
        self.task = task
        self.iters = iters

    def loss(self, step: int, *, shared: bool = True) -> float:
        """Mean validation loss over the fixed batches, shared out among workers (or all on
        this worker when not ``shared``)."""
        model = self.task.model
        model.eval()
        total, count = 0.0, 0
        n = self.keeper.num_shares
        mine = set(self.keeper.mine)
        for i in range(self.iters):
            # Each share's batches, by whoever holds it.
            if shared and i % n not in mine:
                continue
            _, loss = model(*self.task.val_batch(i))
            assert loss is not None
            total += float(loss.item())
            count += 1
        model.train()
        if not shared:
            return total / count
        sums = self.client.barrier(f"eval-{step}", {"loss": total, "n": count})
        return sums["loss"] / sums["n"]
