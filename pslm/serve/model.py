"""What a serving process serves: a run's model, from a checkpoint or following a live cluster.

    served = ServedModel.from_checkpoint("runs/bbc-news")          # fixed parameters
    served = ServedModel.from_run("runs/bbc-news")                # shape and tokenizer only
    follower = Follower(served, ParameterReader(addr), every=1.0)  # online: newer versions
    follower.start()
    state = served.current        # one complete parameter set; requests keep theirs to the end

A refresh swaps in a whole new model object at once (``current`` is replaced, never written
into), so a request never sees half of one version and half of another: it takes
``served.current`` once and uses that model to the end, even while a newer one arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pslm.errors import ConfigError, PSLMError
from pslm.lm.checkpoint import assemble, load_classifier, load_model, read_run_model
from pslm.lm.classifier import GPTClassifier
from pslm.lm.model import GPT
from pslm.lm.tokenizer import Tokenizer, load_tokenizer
from pslm.ps.client.reader import ParameterReader

log = logging.getLogger("pslm.serve")


@dataclass(frozen=True, slots=True)
class State:
    """One complete parameter set and where it came from."""

    model: GPT | GPTClassifier
    version: int
    """The servers' parameter version (a checkpoint: the version it saved)."""
    step: int
    """Training steps behind these parameters."""
    refreshed_at: float
    """Unix time at which this set was taken in."""


class ServedModel:
    """A run's tokenizer and task, and its current parameters (``current``)."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], tokenizer: Tokenizer, source: str):
        self.run_dir = run_dir
        self.meta = meta
        self.tokenizer = tokenizer
        self.source = source
        """``checkpoint`` or ``cluster``."""
        self.current: State | None = None

    @property
    def task(self) -> str:
        """``generate`` (a language model) or ``classify``."""
        return "classify" if self.meta.get("task") == "classify" else "generate"

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in self.meta.get("labels") or []]

    @property
    def block_size(self) -> int:
        return int(self.meta["model"]["block_size"])

    @classmethod
    def from_checkpoint(
        cls, run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"
    ) -> ServedModel:
        """A run's newest (or the given) checkpoint; ConfigError if there is none."""
        classify = read_run_model(run_dir).get("task") == "classify"
        loader = load_classifier if classify else load_model
        model, tokenizer, meta = loader(run_dir, checkpoint, device)
        served = cls(Path(run_dir), meta, tokenizer, "checkpoint")
        step = int(meta.get("step", 0))
        served.current = State(model, int(meta.get("version", step)), step, time.time())
        return served

    @classmethod
    def from_run(cls, run_dir: str | Path) -> ServedModel:
        """A run's model shape, task and tokenizer, with no parameters yet (a Follower brings
        them)."""
        meta = read_run_model(run_dir)
        tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
        if tokenizer.vocab_size != meta["model"]["vocab_size"]:
            raise ConfigError(f"{run_dir}: the tokenizer does not match the model")
        return cls(Path(run_dir), meta, tokenizer, "cluster")

    def take(self, tensors: dict[str, torch.Tensor], version: int, device: str) -> State:
        """Build a model from a complete parameter set and make it the current one."""
        state = State(assemble(self.meta, tensors, device), version, version, time.time())
        self.current = state  # one reference assignment: requests see the old or the new
        return state


class Follower(threading.Thread):
    """Keeps a ServedModel at the cluster's newest version: every ``every`` seconds it asks the
    servers for their version (no tensors) and, if it advanced, reads the whole set."""

    def __init__(self, served: ServedModel, scheduler: str, *, every: float, device: str = "cpu"):
        super().__init__(name="pslm-follower", daemon=True)
        if every <= 0:
            raise ConfigError(f"the refresh interval must be positive, got {every:g}")
        self.served = served
        self.scheduler = scheduler
        self.every = every
        self.device = device
        self.stop_event = threading.Event()
        self.refreshes = 0
        self.last_error = ""
        self.first = threading.Event()
        """Set once the first round is over (taken in, or failed)."""

    def refresh(self, reader: ParameterReader) -> bool:
        """One round; True if a newer version was taken in. PSLMError if the cluster cannot
        be read."""
        current = self.served.current
        if current is not None and reader.version() <= current.version:
            return False
        snap = reader.read()
        if snap.synchronous and not snap.consistent:
            log.info("servers at versions %s: the next round reads again", snap.versions)
            return False
        if current is not None and snap.version <= current.version:
            return False
        state = self.served.take(snap.tensors, snap.version, self.device)
        self.refreshes += 1
        log.info("serving version %d", state.version)
        return True

    def run(self) -> None:
        reader = ParameterReader(self.scheduler, timeout=max(10.0, 5 * self.every))
        try:
            while not self.stop_event.is_set():
                try:
                    self.refresh(reader)
                    self.last_error = ""
                except PSLMError as exc:  # a server failing over, the cluster stopping
                    if str(exc) != self.last_error:
                        log.warning("cannot refresh from the cluster: %s", exc)
                    self.last_error = str(exc)
                self.first.set()
                self.stop_event.wait(self.every)
        finally:
            reader.close()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the round in progress and wait for it (at most ``timeout`` seconds): a
        thread still inside torch while the interpreter exits aborts the process. False if it
        did not stop in time."""
        self.stop_event.set()
        self.join(timeout)
        return not self.is_alive()
