"""``pslm train``: prepare the data, start a local cluster, show progress, end with a sample.

    code = train(TrainConfig())           # the defaults: small GPT on bbc-news, 2+2 processes

The run directory gets ``config.toml`` (the resolved configuration), ``tokenizer.json``,
``cluster.json`` (kept by the scheduler), ``metrics.jsonl`` (written by worker 0),
``checkpoints/step_NNNNNNN/`` and ``logs/``. Ctrl-C stops every process; completed checkpoints
stay.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pslm.errors import ConfigError, LaunchError
from pslm.files import write_atomic
from pslm.lm.checkpoint import (
    latest_checkpoint,
    load_model,
    newest_verified,
    set_aside,
    write_run_model,
)
from pslm.lm.corpus import BUILTIN, load_corpus
from pslm.lm.data import PreparedData, prepare
from pslm.lm.generate import generate
from pslm.lm.model import GPT
from pslm.ps.launch.local import LaunchConfig, LocalCluster
from pslm.train import finetune as ft
from pslm.train.config import TrainConfig, dump_toml, load_config
from pslm.train.evaluate import run_data
from pslm.train.logfile import read_records
from pslm.train.metrics import format_report
from pslm.train.tasks import ClassifyData, load_data

console = Console(highlight=False)


def train(cfg: TrainConfig) -> int:
    """Run a whole training job locally; returns the exit code (raises on failure)."""
    started = time.perf_counter()
    if cfg.finetune.task:
        raise ConfigError("this configuration fine-tunes: use pslm finetune (or drop [finetune])")
    corpus = load_corpus(cfg.data.name)
    run_dir = _new_run_dir(cfg, corpus.name)
    cfg = recorded(cfg, run_dir)
    console.print(f"[bold]pslm train[/] -> {run_dir}")
    data = prepare(
        corpus,
        tokenizer=cfg.data.tokenizer,
        vocab_size=cfg.data.vocab_size,
        val_fraction=cfg.data.val_fraction,
        cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else None,
    )
    model_cfg = cfg.model.gpt(data.vocab_size)
    _check_data(data, model_cfg.block_size)
    if cfg.train.sample_prompt:  # before hours of training, not after
        data.tokenizer().encode(cfg.train.sample_prompt)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(cfg.to_dict()))
    shutil.copyfile(data.path / "tokenizer.json", run_dir / "tokenizer.json")
    record = {
        "corpus": corpus.name,
        "source": cfg.data.name,
        "fingerprint": corpus.fingerprint,
        "prepared": str(data.path),
    }
    (run_dir / "data.json").write_text(json.dumps(record, indent=2) + "\n")
    _describe(cfg, data, corpus.name)
    return _launch(cfg, data, run_dir, started, resume_from=None)


def recorded(cfg: TrainConfig, run_dir: Path | None = None) -> TrainConfig:
    """What a run of ``cfg`` in ``run_dir`` records as its config.toml: the corpus by its
    absolute path (a built-in one by name), every derived value spelled out. Without
    ``run_dir``: ``cfg.run_dir``, empty when the run is to make one up as it starts."""
    source = cfg.data.name if cfg.data.name in BUILTIN else str(Path(cfg.data.name).resolve())
    where = run_dir or (Path(cfg.run_dir) if cfg.run_dir else None)
    data = replace(cfg.data, name=source)
    return replace(cfg, run_dir=str(where) if where else "", data=data).resolved()


def resume(run_dir: Path, *, restarts: int | None = None) -> int:
    """Continue a run from its newest complete checkpoint: the same configuration, steps,
    schedule and data order. Returns the exit code (raises on failure). ``restarts``: how
    many more times a dead server without a backup may send the run back to its last
    checkpoint (default ``cluster.server_restarts``)."""
    started = time.perf_counter()
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"no run to resume at {run_dir} (it has no config.toml)")
    cfg = load_config(run_dir / "config.toml")
    checkpoint, passed = newest_verified(run_dir)
    if checkpoint is None:
        why = "; ".join(f"{p.name}: {problem}" for p, problem in passed)
        raise ConfigError(
            f"{run_dir} has no complete checkpoint to resume from{why and f' ({why})'}"
        )
    for path, problem in passed:  # the run writes their steps again
        console.print(
            f"[yellow]skipped checkpoint {path.name}: {problem}; moved to {set_aside(path)}[/]"
        )
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
        step, version, rounds = int(meta["step"]), int(meta["version"]), int(meta.get("round", 0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {checkpoint} is corrupt: bad meta.json ({exc})") from None
    if step >= cfg.train.steps:
        raise ConfigError(f"{run_dir} is complete ({step} of {cfg.train.steps} steps)")
    if meta.get("servers") != cfg.cluster.servers or meta.get("workers") != cfg.cluster.workers:
        raise ConfigError(f"checkpoint {checkpoint} was written by another cluster shape")
    data: PreparedData | ClassifyData
    if cfg.finetune.task:
        data = _classify_data(run_dir)
    else:
        data = run_data(run_dir, cfg, "the run cannot continue on the same data")
    _drop_partial_checkpoints(run_dir)
    kept = _truncate_metrics(run_dir / "metrics.jsonl", step, meta.get("record"))
    console.print(f"[bold]pslm train --resume[/] {run_dir} from {checkpoint.name}")
    _describe(cfg, data, Path(cfg.data.name).name)
    args = {
        "checkpoint": str(checkpoint.resolve()),
        "step": step,
        "version": version,
        "round": rounds,
        "time": float(kept[-1]["time"]) if kept else 0.0,
        # what pslm ctl set stays set (but a resumed run runs: not paused)
        "steering": {**meta["steering"], "paused": False} if meta.get("steering") else None,
    }
    return _launch(cfg, data, run_dir, started, resume_from=args, seen=len(kept), restarts=restarts)


def finetune(
    pretrained: Path, data_spec: str, overrides: dict[str, dict[str, Any]], run_dir: str = ""
) -> int:
    """Fine-tune a pretrained run on labelled data (``pslm.train.finetune``), then evaluate
    the result on the test split. Returns the exit code (raises on failure)."""
    started = time.perf_counter()
    cfg = replace(ft.plan(pretrained, data_spec, overrides), run_dir=run_dir)
    path = _new_run_dir(cfg, f"{Path(data_spec).name}-ft")
    console.print(f"[bold]pslm finetune[/] {pretrained} -> {path}")
    cfg, data, record = ft.prepare_run(cfg, pretrained, path)
    _describe(cfg, data, cfg.data.name)
    if (saw := record["pretraining_saw"] or {}).get("test"):
        tests = record["split"]["test"]
        console.print(f"pre-training read {saw['test']} of the {tests} test texts (unlabelled)")
    return _launch(cfg, data, path, started, resume_from=None)


def finetune_config(
    pretrained: Path, data_spec: str, overrides: dict[str, dict[str, Any]], run_dir: str = ""
) -> TrainConfig:
    """What ``finetune`` with these arguments records as the run's config.toml (``run_dir``
    empty: the run makes one up as it starts). Reads the pretrained run and the labelled
    data; writes nothing."""
    cfg, _, _ = ft.labelled(ft.plan(pretrained, data_spec, overrides))
    return ft.recorded(cfg, Path(run_dir) if run_dir else None)


def _drop_partial_checkpoints(run_dir: Path) -> None:
    """Remove checkpoints cut short (``.tmp-*``: never published). Only while nothing runs."""
    for stale in (run_dir / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _lost_shards(run_dir: Path) -> list[int]:
    """The shards the scheduler found lost (their server died with no synced backup)."""
    try:
        doc = json.loads((run_dir / "cluster.json").read_text())
        return [int(s) for s in doc.get("lost_shards", [])]
    except (OSError, ValueError, TypeError):
        return []


def _classify_data(run_dir: Path) -> ClassifyData:
    data = load_data(run_dir / "data")
    if not isinstance(data, ClassifyData):
        raise ConfigError(f"{run_dir}/data holds no labelled split")
    return data


def _describe(cfg: TrainConfig, data: PreparedData | ClassifyData, corpus: str) -> None:
    model_cfg = cfg.model.gpt(data.vocab_size)
    n_params = GPT(model_cfg).num_params()
    if isinstance(data, ClassifyData):
        sizes = data.meta["sizes"]
        what = (
            f"{sizes['train']:,} train / {sizes['val']:,} val / {sizes['test']:,} test texts, "
            f"labels {', '.join(data.labels)}"
        )
    else:
        what = (
            f"{data.meta['documents']} documents, {data.meta['train_tokens']:,} train / "
            f"{data.meta['val_tokens']:,} val tokens"
        )
    console.print(
        f"data: {corpus}, {what} ({cfg.data.tokenizer}, vocab {data.vocab_size})\n"
        f"model: {cfg.model.preset} {model_cfg.n_layer}x{model_cfg.n_head}x{model_cfg.n_embd}, "
        f"block {model_cfg.block_size}, {n_params / 1e6:.2f}M parameters\n"
        f"cluster: {cfg.cluster.servers} servers, {cfg.cluster.workers} workers, "
        f"{cfg.cluster.consistency}; {cfg.train.steps} steps of {cfg.train.batch_size} sequences"
    )


def _launch(
    cfg: TrainConfig,
    data: PreparedData | ClassifyData,
    run_dir: Path,
    started: float,
    resume_from: dict[str, Any] | None,
    seen: int = 0,
    restarts: int | None = None,
) -> int:
    """Start the cluster and follow the run. A server that dies without a backup, or a worker
    killed where its share cannot go to the others, stops it: the whole cluster then starts
    again from the newest checkpoint (the workers go back to its step), at most
    ``cluster.server_restarts`` times."""
    args = {"config": cfg.to_dict(), "run_dir": str(run_dir), "data_path": str(data.path)}
    write_run_model(run_dir, cfg.model.gpt(data.vocab_size), cfg.finetune.model_meta())
    launch = LaunchConfig(
        num_servers=cfg.cluster.servers,
        num_workers=cfg.cluster.workers,
        worker="pslm.train.worker:run",
        worker_args={**args, "resume": resume_from},
        run_dir=str(run_dir),
        timeout=cfg.cluster.timeout,
        heartbeat_interval=cfg.cluster.heartbeat_interval,
        heartbeat_timeout=cfg.cluster.heartbeat_timeout,
        threads_per_worker=cfg.train.threads,
        secure=cfg.cluster.secure,
        restarts=cfg.cluster.worker_restarts if cfg.recovers_workers else 0,
        replicas=cfg.replicas,
        server_restarts=cfg.cluster.server_restarts,
        steering=json.dumps(steering) if (steering := (resume_from or {}).get("steering")) else "",
    )
    left = cfg.cluster.server_restarts if restarts is None else restarts
    cluster = _cluster(cfg, launch)
    try:
        with cluster:
            _follow(cluster, run_dir / "metrics.jsonl", cfg.train.steps, seen)
    except LaunchError:
        dead = cluster.failed
        lost = _lost_shards(run_dir)
        server = dead is not None and dead.role == "server"
        # a worker killed where its share cannot go to others (SSP, ASP, local SGD, overlap)
        killed = dead is not None and dead.role == "worker" and (dead.proc.returncode or 0) < 0
        if not (lost or server or killed) or left <= 0:
            raise
        last = latest_checkpoint(run_dir)
        if last is None:
            raise
        what = f"shard {lost[0]}" if lost else f"{dead.name if dead else 'a server'}"
        console.print(
            f"\n[bold]{what} died[/] and nothing can take its place: the cluster starts again "
            f"from {last.name}"
        )
        return resume(run_dir, restarts=left - 1)
    except KeyboardInterrupt:  # every process has stopped (leaving ``with cluster`` did it)
        _drop_partial_checkpoints(run_dir)  # one that was being written when the signal came
        last = latest_checkpoint(run_dir)
        console.print(f"\ninterrupted; every process stopped. Last checkpoint: {last or 'none'}")
        raise
    _summary(run_dir, cfg, time.perf_counter() - started)
    return 0


def _cluster(cfg: TrainConfig, launch: LaunchConfig) -> LocalCluster:
    if cfg.cluster.launcher == "local":
        return LocalCluster(launch)
    from pslm.ps.launch.ray import RayCluster

    address = cfg.cluster.ray_address or ("auto" if os.environ.get("RAY_ADDRESS") else "local")
    gpus = 1.0 if cfg.train.device.startswith("cuda") else 0.0
    return RayCluster(launch, address=address, gpus_per_worker=gpus)


def _truncate_metrics(path: Path, step: int, last: Any) -> list[dict[str, Any]]:
    """Keep the records of the steps before ``step`` (a resumed run writes the rest again),
    completed by ``last``, the checkpoint's copy of the record of step ``step - 1`` (a kill can
    come after the checkpoint and before its line); returns them."""
    log = read_records(path)
    if log.skipped:
        console.print(
            f"{path}: skipped {log.skipped} line(s) that are not records (torn or corrupt)"
        )
    kept = [r for r in log.records if r["step"] < step]
    if (
        isinstance(last, dict)
        and last.get("step") == step - 1
        and (not kept or kept[-1]["step"] < step - 1)
    ):
        kept.append(last)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _new_run_dir(cfg: TrainConfig, corpus: str) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in corpus)[:30]
        path = Path("runs") / f"{slug}-{stamp}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {path} is a file; choose another --run-dir")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(
            f"run directory {path} already exists and is not empty; choose another --run-dir"
        )
    return path


def _check_data(data: PreparedData, block_size: int) -> None:
    for split in ("train", "val"):
        n = int(str(data.meta[f"{split}_tokens"]))
        if n < block_size + 1:
            raise ConfigError(
                f"the {split} split has {n} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}: use a larger corpus or a smaller --block-size"
            )


def _follow(cluster: LocalCluster, metrics: Path, steps: int, seen: int = 0) -> None:
    """Show a progress bar fed by metrics.jsonl (after its first ``seen`` records) until the
    cluster is done."""
    columns = (
        TextColumn("step {task.completed:>6.0f}/{task.total:.0f}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=steps, status="starting", completed=seen)
        rate = None
        while not cluster.poll():
            seen, rate = _advance(bar, task, metrics, seen, rate)
            time.sleep(0.25)
        cluster.wait()
        _advance(bar, task, metrics, seen, rate)


def _advance(
    bar: Progress, task: Any, metrics: Path, seen: int, rate: float | None
) -> tuple[int, float | None]:
    records = read_records(metrics).records
    for rec in records[seen:]:
        rate = rec["tokens_per_s"] if rate is None else 0.9 * rate + 0.1 * rec["tokens_per_s"]
        loss = "-" if rec["loss"] is None else f"{rec['loss']:.4f}"
        status = f"loss {loss}  {rate:,.0f} tok/s"
        if "skipped" in rec:
            bar.console.print(f"step {rec['step'] + 1}: skipped: {rec['skipped']}")
        if "val_loss" in rec:
            bar.console.print(
                f"step {rec['step'] + 1}: train loss {loss}, val loss {rec['val_loss']:.4f}"
            )
        bar.update(task, completed=rec["step"] + 1, status=status)
    return len(records), rate


def _summary(run_dir: Path, cfg: TrainConfig, seconds: float) -> None:
    records = read_records(run_dir / "metrics.jsonl").records
    val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), math.nan)
    checkpoint = latest_checkpoint(run_dir)
    console.print(f"done in {seconds:.0f} s: val loss {val:.4f}, checkpoint {checkpoint}")
    if cfg.finetune.task and checkpoint is not None:
        result = ft.evaluate_classifier(run_dir)
        console.print(format_report(result["model"], "the fine-tuned model, test split:"))
        console.print(format_report(result["baseline"], f"{result['baseline']['name']}:"))
        return
    if cfg.train.sample_tokens and checkpoint is not None:
        model, tok, _ = load_model(run_dir)
        prompt = tok.encode(cfg.train.sample_prompt) if cfg.train.sample_prompt else [tok.eot_id]
        ids = generate(
            model,
            prompt,
            max_new_tokens=cfg.train.sample_tokens,
            temperature=0.8,
            top_k=50,
            seed=cfg.train.seed,
        )
        console.rule("sample")
        console.print(tok.decode(list(prompt) + ids).strip(), markup=False)
        console.rule()
