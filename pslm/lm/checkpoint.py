"""Model checkpoints: ``checkpoints/step_NNNNNNN/`` in a run directory.

    write_model(tmp_dir, model, meta={"step": 100})     # model.safetensors + meta.json
    path = latest_checkpoint(run_dir)                  # newest complete one, or None
    path, passed = newest_verified(run_dir)            # newest whose files match their digests
    model, tokenizer, meta = load_model(run_dir)       # ready for generation or evaluation
    write_run_model(run_dir, model.config, {"task": ""})  # model.json: the shape, for readers
    model = assemble(read_run_model(run_dir), tensors)   # a model from a cluster's tensors

A checkpoint directory appears only when complete: it is written under a temporary name,
every file is fsynced, then it is renamed (``publish``). ``meta.json`` holds the model's shape
and the step, and the size and SHA-256 of every other file (``verify``); the tokenizer is the
run's ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pslm.errors import ConfigError
from pslm.files import fsync, write_atomic
from pslm.lm.classifier import GPTClassifier
from pslm.lm.model import GPT, GPTConfig
from pslm.lm.tokenizer import Tokenizer, load_tokenizer

STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def write_model(directory: Path, model: GPT | GPTClassifier, meta: dict[str, Any]) -> None:
    """``model.safetensors`` (each parameter once) and ``meta.json`` (shape + ``meta``),
    fsynced."""
    params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    save_file(params, str(directory / "model.safetensors"))
    # the size and digest of every file beside it (the servers' shards are written first),
    # which a resume checks before trusting the checkpoint (``verify``)
    doc = {"model": asdict(model.config), **meta, "files": _digests(directory)}
    (directory / "meta.json").write_text(json.dumps(doc, indent=2) + "\n")
    for name in ("model.safetensors", "meta.json"):
        fsync(directory / name)


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete checkpoint into place, then delete all but the newest ``keep``."""
    fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)
    for old in checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints in ``root``, oldest first: by step number (as text,
    step_10000000 would sort before step_9999999)."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path`` (a file missing, truncated or changed
    since it was written, or an unreadable meta.json), or None if nothing is. A checkpoint
    written before digests were kept has only its meta.json checked."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        files = meta.get("files", {})
        if not isinstance(files, dict):
            raise TypeError("'files' is not a table")
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return f"bad meta.json ({exc})"
    for name, want in sorted(files.items()):
        try:
            size = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(want, dict):
            return f"bad meta.json (the entry of {name} is not a table)"
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, not the {want.get('bytes')} written"
        if _sha256(path / name) != want.get("sha256"):
            return f"{name} changed since it was written (its digest differs)"
    return None


def newest_verified(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that ``verify`` accepts (or None), and each newer one
    it passed over, with why."""
    passed: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(Path(run_dir) / "checkpoints")):
        problem = verify(path)
        if problem is None:
            return path, passed
        passed.append((path, problem))
    return None, passed


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint to ``checkpoints/damaged/`` (kept for a look, out of the way
    of the run that writes its step again); returns where it went."""
    root = path.parent / "damaged"
    root.mkdir(exist_ok=True)
    dest, n = root / path.name, 1
    while dest.exists():
        dest, n = root / f"{path.name}.{n}", n + 1
    os.replace(path, dest)
    return dest


def _digests(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "meta.json"
    }


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = checkpoints(Path(run_dir) / "checkpoints")
    return done[-1] if done else None


def load_model(
    run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """The model of a run's newest (or the given) checkpoint, its tokenizer and meta.

    ConfigError with a one-line reason if the run or checkpoint is missing or corrupt.
    """
    path, meta, config, params = _read_checkpoint(run_dir, checkpoint)
    if meta.get("task") == "classify":
        raise ConfigError(f"{run_dir} is a classification run: it does not generate text")
    model = GPT(config)
    _load(model, params, path)
    return model.to(device).eval(), _tokenizer(run_dir, config), meta


def load_classifier(
    run_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu"
) -> tuple[GPTClassifier, Tokenizer, dict[str, Any]]:
    """The fine-tuned classifier of a run's newest (or the given) checkpoint, its tokenizer
    and meta (``labels``). ConfigError if the run has no classification head."""
    path, meta, config, params = _read_checkpoint(run_dir, checkpoint)
    labels = meta.get("labels")
    if meta.get("task") != "classify" or not isinstance(labels, list) or len(labels) < 2:
        raise ConfigError(f"{run_dir} has no classification head: fine-tune it first")
    model = GPTClassifier(config, len(labels), meta.get("pooling", "last"))
    _load(model, params, path)
    return model.to(device).eval(), _tokenizer(run_dir, config), meta


MODEL_FILE = "model.json"
"""In a run directory: the model's shape, task and labels (what a process that reads the
parameters from a live cluster needs to build the model)."""


def write_run_model(run_dir: str | Path, config: GPTConfig, meta: dict[str, Any]) -> None:
    doc = {"model": asdict(config), **meta}
    write_atomic(Path(run_dir) / MODEL_FILE, json.dumps(doc, indent=2) + "\n")  # workers race


def read_run_model(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``model.json`` (or its newest checkpoint's meta.json, for older runs);
    ConfigError if neither is there or readable."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        ckpt = latest_checkpoint(run_dir)
        path = ckpt / "meta.json" if ckpt is not None else path
    try:
        doc = json.loads(path.read_text())
        GPTConfig(**doc["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the model of run {run_dir} from {path}: {exc}") from None
    return dict(doc)


def assemble(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], device: str = "cpu"
) -> GPT | GPTClassifier:
    """The model ``meta`` (a ``model.json`` or checkpoint meta) describes, with ``tensors``
    as its parameters (taken, not copied, on the CPU); no initialisation is run. ConfigError
    if a tensor is missing or has the wrong shape."""
    config = GPTConfig(**meta["model"])
    labels = meta.get("labels") or []
    with torch.device("meta"):
        model: GPT | GPTClassifier = (
            GPTClassifier(config, len(labels), meta.get("pooling", "last"))
            if meta.get("task") == "classify"
            else GPT(config)
        )
    new: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():  # each once: a tied weight stays one tensor
        t = tensors.get(name)
        if t is None or tuple(t.shape) != tuple(p.shape):
            got = "missing" if t is None else f"shape {list(t.shape)}"
            raise ConfigError(f"parameter {name}: {got}, the model wants {list(p.shape)}")
        new[id(p)] = torch.nn.Parameter(t.to(device), requires_grad=False)
    for module in model.modules():
        for attr, old in list(module._parameters.items()):
            if old is not None:
                module._parameters[attr] = new[id(old)]
    return model.eval()


def _read_checkpoint(
    run_dir: str | Path, checkpoint: str | Path | None
) -> tuple[Path, dict[str, Any], GPTConfig, dict[str, torch.Tensor]]:
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"no run directory at {run}")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if path is None or not path.is_dir():
        raise ConfigError(
            f"{run} has no checkpoint yet" if path is None else f"no checkpoint at {path}"
        )
    try:
        meta = json.loads((path / "meta.json").read_text())
        config = GPTConfig(**meta["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {path} is corrupt: bad meta.json ({exc})") from None
    try:
        params = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"checkpoint {path} is corrupt: {exc}") from None
    return path, meta, config, params


def _load(model: torch.nn.Module, params: dict[str, torch.Tensor], path: Path) -> None:
    own = dict(model.named_parameters())
    if set(params) != set(own):
        raise ConfigError(f"checkpoint {path} is corrupt: its tensors do not match the model")
    with torch.no_grad():
        for name, p in own.items():
            if params[name].shape != p.shape:
                raise ConfigError(
                    f"checkpoint {path} is corrupt: {name} has shape "
                    f"{list(params[name].shape)}, expected {list(p.shape)}"
                )
            p.copy_(params[name])


def _tokenizer(run_dir: str | Path, config: GPTConfig) -> Tokenizer:
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    if tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(
            f"{Path(run_dir) / 'tokenizer.json'} has {tokenizer.vocab_size} tokens, the "
            f"model {config.vocab_size}"
        )
    return tokenizer
