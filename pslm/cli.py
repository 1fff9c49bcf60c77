"""The ``pslm`` command line: parse, build a config, call one function.

Role commands read ``PSLM_*`` environment variables for any flag not given (like ps-lite's
``DMLC_*``): PSLM_SCHEDULER, PSLM_BIND, PSLM_ADVERTISE, PSLM_RANK, PSLM_TIMEOUT,
PSLM_NUM_WORKERS, PSLM_NUM_SERVERS, PSLM_RUN_DIR, PSLM_HEARTBEAT_INTERVAL,
PSLM_HEARTBEAT_TIMEOUT, PSLM_THREADS, PSLM_WORKER_ARGS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError, PSLMError


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _resolve_env(args)
        return int(args.func(args) or 0)
    except PSLMError as exc:
        print(f"pslm: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pslm: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The first line of an error: errors put what went wrong and what to do there."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class EnvDefault:
    """A flag's default taken from a PSLM_* variable, read only by the command that runs."""

    def __init__(self, name: str, kind: Callable[[str], Any], fallback: Any):
        self.name, self.kind, self.fallback = name, kind, fallback

    def value(self) -> Any:
        return _env(self.name, self.kind, self.fallback)


def _resolve_env(args: argparse.Namespace) -> None:
    for key, value in vars(args).items():
        if isinstance(value, EnvDefault):
            setattr(args, key, value.value())


def _env(name: str, kind: Callable[[str], Any], default: Any) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pslm",
        description="Train GPT-style language models on a parameter server.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("train", help="train a GPT on a local parameter-server cluster")
    s.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    s.add_argument(
        "--data",
        metavar="NAME|PATH",
        help="bbc-news (default), a text file, a directory of text files, or JSONL",
    )
    s.add_argument("--model", metavar="PRESET", help="tiny, small (default) or gpt2")
    s.add_argument("--tokenizer", choices=["bpe", "bpe-jieba", "char"], help="default bpe")
    s.add_argument("--steps", type=int, help="optimizer steps")
    s.add_argument("--batch-size", type=int, help="GLOBAL sequences per step, split over workers")
    s.add_argument("--block-size", type=int, help="context length in tokens")
    s.add_argument("--workers", type=int, help="worker processes (default 2)")
    s.add_argument("--servers", type=int, help="server processes (default 2)")
    s.add_argument("--consistency", help="bsp (default), ssp:S, asp or local:H")
    s.add_argument(
        "--replicas",
        type=int,
        choices=[0, 1],
        help="a backup server per shard (default: 1 with two or more servers, no overlap)",
    )
    s.add_argument("--push-codec", help="none (default), bf16, fp16, int8 or topk:RATIO")
    s.add_argument("--pull-codec", help="none (default), bf16 or fp16")
    s.add_argument(
        "--launcher",
        choices=["local", "ray"],
        help="local processes (default) or Ray actors (pip install 'pslm[ray]')",
    )
    s.add_argument(
        "--address",
        help="--launcher ray: auto, ray://HOST:PORT, HOST:PORT or local (a private Ray here; "
        "the default unless RAY_ADDRESS is set)",
    )
    s.add_argument(
        "--overlap",
        action="store_const",
        const=True,
        help="push gradients during backward; the next forward waits per layer",
    )
    s.add_argument(
        "--no-shm",
        action="store_const",
        const=False,
        dest="shm",
        help="always exchange over the socket, also between processes on this machine "
        "(default: shared memory there)",
    )
    s.add_argument(
        "--secure",
        action="store_const",
        const=True,
        help="encrypt all traffic (ZeroMQ CURVE); nodes always prove a per-run secret",
    )
    s.add_argument(
        "--untie-embeddings",
        action="store_const",
        const=False,
        dest="tie_embeddings",
        help="a separate output head; the embedding travels by rows (sparse)",
    )
    s.add_argument(
        "--slow-worker",
        metavar="RANK:FACTOR",
        help="experiment: that worker computes FACTOR times slower",
    )
    s.add_argument(
        "--straggle",
        metavar="PROB:FACTOR",
        help="experiment: each step a worker is delayed FACTOR x its compute time "
        "with probability PROB",
    )
    s.add_argument("--seed", type=int, help="seed of the initial model and the batch order")
    s.add_argument("--device", help="cpu (default) or cuda[:N]")
    s.add_argument("--run-dir", help="run directory (default runs/<corpus>-<date>-<time>)")
    s.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue that run from its newest checkpoint (takes no other option)",
    )
    s.set_defaults(func=_train)

    s = sub.add_parser("generate", help="generate text from a trained run")
    s.add_argument("--run", required=True, metavar="DIR", help="run directory")
    s.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    s.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (200)")
    s.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (0.8)")
    s.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (50)")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    s.add_argument("--seed", type=int, default=None, help="fixes the sampled text")
    s.add_argument("--checkpoint", metavar="DIR", help="a checkpoint (default: the newest)")
    s.add_argument("--no-cache", action="store_true", help="recompute without the KV cache")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    s.set_defaults(func=_generate)

    s = sub.add_parser(
        "eval", help="validation loss of a trained run; test metrics of a fine-tuned one"
    )
    s.add_argument("--run", required=True, metavar="DIR", help="run directory")
    s.add_argument("--iters", type=int, default=200, help="validation batches (200)")
    s.add_argument("--checkpoint", metavar="DIR", help="a checkpoint (default: the newest)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_eval)

    s = sub.add_parser("finetune", help="fine-tune a pretrained run on labelled text")
    s.add_argument("--run", required=True, metavar="DIR", help="the pretrained run")
    s.add_argument("--task", choices=["classify"], default="classify")
    s.add_argument("--data", required=True, help="bbc-news, zh-sentiment, or JSONL/CSV")
    s.add_argument("--steps", type=int, help="optimizer steps (600)")
    s.add_argument("--batch-size", type=int, help="GLOBAL texts per step (16)")
    s.add_argument("--lr", type=float, help="peak learning rate (3e-4)")
    s.add_argument("--workers", type=int, help="worker processes (2)")
    s.add_argument("--servers", type=int, help="server processes (2)")
    s.add_argument("--consistency", help="bsp (default), ssp:S, asp or local:H")
    s.add_argument("--eval-interval", type=int, help="steps between validation losses (50)")
    s.add_argument("--seed", type=int, help="seed of the head and the batch order")
    s.add_argument("--split-seed", type=int, help="seed of the train/val/test split (0)")
    s.add_argument("--folds", type=int, help="k-fold cross-validation: test on one fold of K")
    s.add_argument("--fold", type=int, help="which fold is the test part (0 .. K-1)")
    s.add_argument(
        "--pooling", choices=["mean", "last"], help="a window's vector: mean of states or last"
    )
    s.add_argument("--windows", type=int, help="read a text as up to N context windows (8)")
    s.add_argument("--device", help="cpu (default) or cuda[:N]")
    s.add_argument("--run-dir", help="run directory (default runs/<data>-ft-<date>-<time>)")
    s.set_defaults(func=_finetune)

    s = sub.add_parser("report", help="plots and a Markdown summary of a run")
    s.add_argument("--run", required=True, metavar="DIR", help="run directory")
    s.set_defaults(func=_report)

    s = sub.add_parser(
        "baseline", help="TF-IDF + logistic regression on a labelled set's seeded test split"
    )
    s.add_argument("--data", required=True, help="bbc-news, zh-sentiment, or JSONL/CSV")
    s.add_argument("--seed", type=int, default=0, help="the split's seed (0)")
    s.add_argument("--language", choices=["auto", "en", "zh"], default="auto")
    s.add_argument(
        "--pos", default="", help="Chinese: keep jieba POS tags starting so, e.g. n,v,a,d"
    )
    s.add_argument("--stopwords", action="store_true", help="drop stop words first")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_baseline)

    s = sub.add_parser("scheduler", help="run the scheduler of a cluster")
    s.add_argument(
        "--num-workers",
        type=int,
        default=EnvDefault("PSLM_NUM_WORKERS", int, None),
        help="workers to wait for [PSLM_NUM_WORKERS]",
    )
    s.add_argument(
        "--num-servers",
        type=int,
        default=EnvDefault("PSLM_NUM_SERVERS", int, None),
        help="servers (shards) to wait for [PSLM_NUM_SERVERS]",
    )
    s.add_argument(
        "--replicas",
        type=int,
        choices=[0, 1],
        default=EnvDefault("PSLM_REPLICAS", int, 0),
        help="backups per shard: server ranks from --num-servers on are backups "
        "[PSLM_REPLICAS, default 0]",
    )
    s.add_argument(
        "--bind",
        default=EnvDefault("PSLM_BIND", str, "tcp://127.0.0.1:9000"),
        help="address to listen on [PSLM_BIND, default tcp://127.0.0.1:9000]",
    )
    s.add_argument(
        "--run-dir",
        default=EnvDefault("PSLM_RUN_DIR", str, None),
        help="keep cluster.json here [PSLM_RUN_DIR]",
    )
    s.add_argument("--address-file", help="write the bound address to this file")
    s.add_argument(
        "--recover",
        action="store_true",
        help="take over a running cluster from the state a dead scheduler kept in --run-dir",
    )
    s.add_argument(
        "--steering",
        default="",
        metavar="JSON",
        help="the job's live settings to start from (what pslm ctl set, kept by a checkpoint)",
    )
    _heartbeat_args(s)
    _security_args(s)
    s.add_argument(
        "--startup-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for every node to register",
    )
    s.set_defaults(func=_scheduler)

    s = sub.add_parser("server", help="run one parameter server")
    _scheduler_arg(s)
    s.add_argument(
        "--bind",
        default=EnvDefault("PSLM_BIND", str, "tcp://127.0.0.1:*"),
        help="address to listen on; port * picks a free one [PSLM_BIND]",
    )
    s.add_argument(
        "--advertise",
        default=EnvDefault("PSLM_ADVERTISE", str, ""),
        help="host or host:port that others use to reach this server "
        "[PSLM_ADVERTISE, default: the bound address]",
    )
    _rank_timeout_args(s, timeout=30.0)
    _security_args(s)
    s.set_defaults(func=_server)

    s = sub.add_parser("run-worker", help="run a Python function as a worker of a cluster")
    s.add_argument(
        "target",
        metavar="MODULE:FUNCTION",
        help="called as FUNCTION(client, **args) with a connected PSClient",
    )
    _scheduler_arg(s)
    _rank_timeout_args(s, timeout=60.0)
    s.add_argument(
        "--args",
        default=EnvDefault("PSLM_WORKER_ARGS", str, "{}"),
        help="keyword arguments as a JSON object [PSLM_WORKER_ARGS]",
    )
    _security_args(s)
    s.set_defaults(func=_run_worker)

    s = sub.add_parser("worker", help="train as one worker of a cluster (multi-host jobs)")
    _scheduler_arg(s)
    _rank_timeout_args(s, timeout=60.0)
    s.add_argument("--config", metavar="FILE.toml", help="the job's settings (as pslm train)")
    s.add_argument("--data", help="corpus: bbc-news, zh-news, a file or directory of text")
    s.add_argument(
        "--run-dir",
        default=EnvDefault("PSLM_RUN_DIR", str, None),
        help="the run directory, one path every worker and server can write [PSLM_RUN_DIR]",
    )
    s.add_argument("--steps", type=int, help="training steps")
    s.add_argument("--device", help="cpu or cuda[:N]")
    _security_args(s)
    s.set_defaults(func=_worker)

    s = sub.add_parser("demo", help="train a small MLP on a local parameter-server cluster")
    s.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    s.add_argument("--servers", type=int, default=2, help="server processes (default 2)")
    s.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    s.add_argument("--run-dir", default="", help="run directory (default runs/demo-<time>)")
    s.set_defaults(func=_demo)

    s = sub.add_parser("serve", help="serve a run over HTTP: generate, chat, classify")
    s.add_argument("--run", metavar="DIR", help="run directory (its newest checkpoint)")
    s.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="follow a live cluster: serve its parameters as they train (with --run: that run's "
        "model; without: the run directory the scheduler names)",
    )
    s.add_argument(
        "--follow",
        action="store_true",
        help="with --run: follow the run's own live cluster (its scheduler.addr and secret)",
    )
    s.add_argument("--checkpoint", metavar="DIR", help="a checkpoint (default: the newest)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (8000; 0: any free one)")
    s.add_argument("--refresh", type=float, default=1.0, help="seconds between refreshes (1)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--max-tokens", type=int, default=1024, help="limit per request (1024)")
    s.add_argument("--address-file", default="", help="write the URL here once listening")
    s.add_argument("--no-kv-cache", action="store_true", help="generate without the KV cache")
    s.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="requests computing a token at once (1: they take turns token by token)",
    )
    _security_args(s)
    s.set_defaults(func=_serve)

    s = sub.add_parser("ctl", help="look at and steer a running job")
    s.add_argument("--run", metavar="DIR", help="the run (its scheduler.addr and secret)")
    s.add_argument("--scheduler", metavar="ADDR", help="the cluster's scheduler address")
    s.add_argument(
        "action",
        choices=["status", "set", "pause", "resume", "checkpoint", "add-worker", "remove-worker"],
        help="status; set KEY=VALUE... (lr, clip, weight_decay); pause; resume; checkpoint; "
        "remove-worker ID; add-worker",
    )
    s.add_argument("values", nargs="*", help="for set: KEY=VALUE ...; for remove-worker: ID")
    s.add_argument("--json", action="store_true", help="print the reply as JSON")
    _security_args(s)
    s.set_defaults(func=_ctl)

    s = sub.add_parser("plan", help="predict step time and tokens/s; how many servers")
    s.add_argument("--model", default="gpt2", help="a preset (tiny, small, gpt2, ...)")
    s.add_argument("--layers", type=int, help="override the preset's layers")
    s.add_argument("--width", type=int, help="override the preset's width (n_embd)")
    s.add_argument("--heads", type=int, help="override the preset's attention heads")
    s.add_argument("--block-size", type=int, help="context length (default: the preset's)")
    s.add_argument("--vocab", type=int, default=50304, help="vocabulary size (50304)")
    s.add_argument("--batch-size", type=int, default=512, help="global sequences per step")
    s.add_argument("--workers", type=int, default=8)
    s.add_argument("--servers", type=int, help="predict for this many (default: recommend)")
    s.add_argument("--link-gbps", type=float, default=25.0, help="each node's link (25)")
    s.add_argument("--latency-us", type=float, default=50.0, help="one-way latency (50)")
    s.add_argument(
        "--worker-tflops",
        type=float,
        default=100.0,
        help="what one worker achieves, TFLOP/s (100: a recent GPU at ~40%% of its peak)",
    )
    s.add_argument("--push-codec", default="none", help="none, bf16, fp16, int8, topk:R")
    s.add_argument("--pull-codec", default="none", help="none, bf16, fp16")
    s.add_argument("--overlap", action="store_true", help="exchange during backward")
    s.add_argument("--consistency", default="bsp", help="bsp, ssp:S, asp or local:H")
    s.add_argument(
        "--local", action="store_true", help="this machine's calibration (cores, loopback)"
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_plan)

    s = sub.add_parser("bench", help="run a benchmark; --json prints one JSON object last")
    s.add_argument(
        "name",
        choices=[
            *("transport", "ps", "train", "quality", "consistency", "recovery", "overlap"),
            *("serve", "launchers"),
        ],
        help="which benchmark",
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--quick", action="store_true", help="fewer repetitions (for smoke tests)")
    s.set_defaults(func=_bench)
    return p


def _scheduler_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        default=EnvDefault("PSLM_SCHEDULER", str, None),
        help="scheduler address host:port [PSLM_SCHEDULER]",
    )


def _rank_timeout_args(p: argparse.ArgumentParser, *, timeout: float) -> None:
    p.add_argument(
        "--rank",
        type=int,
        default=EnvDefault("PSLM_RANK", int, -1),
        help="requested rank; -1 lets the scheduler choose [PSLM_RANK]",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=EnvDefault("PSLM_TIMEOUT", float, timeout),
        help=f"request timeout in seconds [PSLM_TIMEOUT, default {timeout:g}]",
    )


def _heartbeat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=EnvDefault("PSLM_HEARTBEAT_INTERVAL", float, 1.0),
        help="seconds between heartbeats [PSLM_HEARTBEAT_INTERVAL, default 1]",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=EnvDefault("PSLM_HEARTBEAT_TIMEOUT", float, 5.0),
        help="seconds of silence before a node is dead [PSLM_HEARTBEAT_TIMEOUT, default 5]",
    )


def _security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--secret-file",
        default=EnvDefault("PSLM_SECRET_FILE", str, None),
        help="file holding the cluster secret [PSLM_SECRET_FILE, or the secret itself in "
        "PSLM_SECRET]; without one, anyone who reaches the ports can join",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        default=EnvDefault("PSLM_SECURE", boolean, False),
        help="encrypt all traffic (ZeroMQ CURVE, keys from the secret) [PSLM_SECURE=1]",
    )


def boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no", ""):
        return False
    raise ValueError(raw)


def _security(args: argparse.Namespace) -> Any:
    """The cluster secret from PSLM_SECRET or --secret-file, as a Security (None: no secret)."""
    from pslm.wire.auth import Security

    secret = os.environ.get("PSLM_SECRET", "")
    if args.secret_file:
        try:
            secret = Path(args.secret_file).read_text()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the secret file {args.secret_file}: {exc.strerror}"
            ) from None
    if not secret.strip():
        if args.secure:
            raise ConfigError("--secure needs a cluster secret (PSLM_SECRET or --secret-file)")
        return None
    return Security.from_secret(secret, encrypt=bool(args.secure))


def _role_setup(role: str, args: argparse.Namespace, *, threads: bool = True) -> None:
    from pslm.ps.launch import supervise_self
    from pslm.wire import auth
    from pslm.wire.transport import tune_allocator

    security = _security(args)
    supervise_self()
    tune_allocator()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {role} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    auth.install(security)
    bind = str(getattr(args, "bind", "") or "")
    if security is None and bind and not bind.removeprefix("tcp://").startswith("127."):
        logging.getLogger("pslm").warning(
            "listening on %s without a cluster secret: anyone who reaches it can join", bind
        )
    n = _env("PSLM_THREADS", int, None)
    if threads and n:
        import torch

        torch.set_num_threads(n)


def _require(value: Any, flag: str, env: str) -> Any:
    if value is None:
        raise ConfigError(f"{flag} is required (or set {env})")
    return value


def _attach(args: argparse.Namespace, run: str | None) -> str:
    """The scheduler address of a live cluster: --scheduler, or the run's own (the address
    and secret a local `pslm train` keeps in its run directory); installs the secret."""
    from pslm.wire import auth

    scheduler = args.scheduler or ""
    if not scheduler:
        if not run:
            raise ConfigError("give --scheduler ADDR or --run DIR")
        try:
            scheduler = (Path(run) / "scheduler.addr").read_text().strip()
        except OSError:
            raise ConfigError(f"{run} has no scheduler.addr: is its cluster up?") from None
    own = Path(run or "") / "secret"
    if run and not args.secret_file and not os.environ.get("PSLM_SECRET") and own.is_file():
        args.secret_file = str(own)
    auth.install(_security(args))
    return scheduler


def _ctl(args: argparse.Namespace) -> int:
    from pslm.ps.steering import parse_assignments
    from pslm.wire.message import Message
    from pslm.wire.transport import Channel

    node = ""
    if args.action == "remove-worker":
        if len(args.values) != 1:
            raise ConfigError("remove-worker takes the worker's id, e.g. remove-worker worker-1")
        node = args.values.pop()
    if args.values and args.action != "set":
        raise ConfigError(f"{args.action} takes no values")
    values = parse_assignments(args.values) if args.action == "set" else {}
    scheduler = _attach(args, args.run)
    channel = Channel(timeout=10.0)
    try:
        channel.connect("scheduler", scheduler)
        if args.action == "status":
            body = channel.request("scheduler", Message("status")).body
        else:
            msg = Message("ctl", body={"action": args.action, "values": values, "node": node})
            body = channel.request("scheduler", msg).body
    finally:
        channel.close()
    if args.json:
        print(json.dumps(body, indent=2, default=str))
    elif args.action == "status":
        _print_status(body)
    elif args.action == "remove-worker":
        moves = ", ".join(f"share {s} -> worker-{w}" for s, w in body.get("moves", {}).items())
        print(f"{node} hands over its shares at its next step and leaves ({moves})")
    elif args.action == "add-worker":
        print("the launcher starts a worker; it takes a removed or dead worker's rank")
    else:
        doc = body.get("steering", {})
        print(f"version {doc.get('version')}: {doc.get('what')} (in force from the next step)")
    return 0


def _print_status(body: dict[str, Any]) -> None:
    import time

    from rich.console import Console
    from rich.table import Table

    table = Table("node", "state", "address", "pid", "last heartbeat")
    now = time.time()
    for n in sorted(body.get("nodes", []), key=lambda n: str(n.get("id"))):
        beat = n.get("last_heartbeat")
        ago = f"{now - beat:.1f} s ago" if isinstance(beat, (int, float)) and beat else "-"
        table.add_row(
            str(n.get("id")), str(n.get("state")), str(n.get("address") or "-"),
            str(n.get("pid")), ago,
        )  # fmt: skip
    console = Console()
    console.print(f"run {body.get('run_dir') or '-'}")
    console.print(table)
    doc = body.get("steering") or {}
    settings = {k: doc[k] for k in ("lr", "clip", "weight_decay") if doc.get(k) is not None}
    console.print(
        f"live settings: version {doc.get('version', 0)}"
        + (f", last change: {doc['what']}" if doc.get("what") else "")
        + (" [bold]paused[/]" if doc.get("paused") else "")
        + (f", {settings}" if settings else "")
    )


def _serve(args: argparse.Namespace) -> int:
    from pslm.serve import ServeConfig, serve

    scheduler = ""
    if args.follow or args.scheduler:
        if args.follow and args.scheduler:
            raise ConfigError("--follow follows the run's own cluster: drop --scheduler")
        if args.follow and not args.run:
            raise ConfigError("--follow goes with --run")
        scheduler = _attach(args, args.run)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s", stream=sys.stderr
    )
    return serve(
        ServeConfig(
            run_dir=args.run or "",
            scheduler=scheduler,
            checkpoint=args.checkpoint or "",
            host=args.host,
            port=args.port,
            refresh=args.refresh,
            device=args.device,
            threads=args.threads,
            address_file=args.address_file,
            max_tokens=args.max_tokens,
            kv_cache=not args.no_kv_cache,
            parallel=args.parallel,
        )
    )


def _scheduler(args: argparse.Namespace) -> int:
    from pslm.ps.scheduler import Scheduler, SchedulerConfig

    cfg = SchedulerConfig(
        num_workers=_require(args.num_workers, "--num-workers", "PSLM_NUM_WORKERS"),
        num_servers=_require(args.num_servers, "--num-servers", "PSLM_NUM_SERVERS"),
        bind=args.bind,
        run_dir=args.run_dir,
        address_file=args.address_file,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        startup_timeout=args.startup_timeout,
        replicas=args.replicas,
        steering=args.steering,
        recover=args.recover,
    )
    _role_setup("scheduler", args, threads=False)
    return Scheduler(cfg).run()


def _server(args: argparse.Namespace) -> int:
    from pslm.ps.server import Server, ServerConfig

    cfg = ServerConfig(
        scheduler=_require(args.scheduler, "--scheduler", "PSLM_SCHEDULER"),
        bind=args.bind,
        advertise=args.advertise,
        rank=args.rank,
        timeout=args.timeout,
    )
    _role_setup("server", args)
    return Server(cfg).run()


def _run_worker(args: argparse.Namespace) -> int:
    from pslm.ps.client import ClientConfig
    from pslm.ps.launch import run_worker

    try:
        kwargs = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--args must be a JSON object")
    cfg = ClientConfig(
        scheduler=_require(args.scheduler, "--scheduler", "PSLM_SCHEDULER"),
        rank=args.rank,
        timeout=args.timeout,
    )
    _role_setup("worker", args)
    run_worker(args.target, cfg, kwargs)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pslm.lm.model import GPTConfig, training_cost
    from pslm.ps.plan import LOCAL, Hardware, Job, predict, recommend

    overrides = {"vocab_size": args.vocab}
    for key, value in (("n_layer", args.layers), ("n_embd", args.width), ("n_head", args.heads)):
        if value is not None:
            overrides[key] = value
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    config = GPTConfig.preset(args.model, **overrides)
    params, flops = training_cost(config)
    job = Job(
        params=params,
        flops_per_token=flops,
        tokens_per_step=args.batch_size * config.block_size,
        workers=args.workers,
        push_codec=args.push_codec,
        pull_codec=args.pull_codec,
        overlap=args.overlap,
        consistency=args.consistency,
    )
    hw = (
        LOCAL
        if args.local
        else Hardware(
            worker_tflops=args.worker_tflops,
            link_gbps=args.link_gbps,
            latency_s=args.latency_us * 1e-6,
        )
    )
    if args.servers:
        pick, why = predict(job, hw, args.servers), "as asked"
    else:
        pick, why = recommend(job, hw)
    out = {
        "model": f"{args.model}: {params / 1e6:.1f}M parameters, {flops / 1e9:.2f} GFLOP/token",
        "hardware": dataclasses.asdict(hw),
        **pick.to_dict(),
        "why": why,
    }
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    print(out["model"])
    print(
        f"{job.workers} workers, {pick.servers} servers: step {pick.step_s * 1e3:.1f} ms "
        f"(compute {pick.compute_s * 1e3:.1f}, worker link {pick.worker_link_s * 1e3:.1f}, "
        f"server link {pick.server_link_s * 1e3:.1f}, update {pick.update_s * 1e3:.1f}, "
        f"latency {pick.latency_s * 1e3:.2f} ms), {pick.tokens_per_s:,.0f} tokens/s"
    )
    print(f"bottleneck: {pick.bottleneck}; {why}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from pslm.ps.client import ClientConfig
    from pslm.train.config import TrainConfig, load_config
    from pslm.train.role import worker

    cfg = load_config(args.config) if args.config else TrainConfig()
    given = {
        "data": {"name": args.data} if args.data else {},
        "train": {k: v for k, v in (("steps", args.steps), ("device", args.device)) if v},
    }
    cfg = cfg.override(**{k: d for k, d in given.items() if d})
    _check_device(cfg.train.device)
    client = ClientConfig(
        scheduler=_require(args.scheduler, "--scheduler", "PSLM_SCHEDULER"),
        rank=args.rank,
        timeout=args.timeout,
    )
    run_dir = Path(_require(args.run_dir, "--run-dir", "PSLM_RUN_DIR"))
    _role_setup("worker", args)
    worker(client, cfg, run_dir)
    return 0


def _train(args: argparse.Namespace) -> int:
    from pslm.train.config import TrainConfig, load_config
    from pslm.train.run import resume, train

    if args.resume:
        extra = [k for k, v in vars(args).items() if v is not None and k not in _NOT_OPTIONS]
        if extra:
            names = ", ".join("--" + k.replace("_", "-") for k in sorted(extra))
            raise ConfigError(f"--resume continues a run as it was set up; drop {names}")
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return resume(Path(args.resume))

    cfg = load_config(args.config) if args.config else TrainConfig()
    flags = {
        "data": {"name": args.data, "tokenizer": args.tokenizer},
        "model": {
            "preset": args.model,
            "block_size": args.block_size,
            "tie_embeddings": args.tie_embeddings,
        },
        "train": {
            "slow_worker": args.slow_worker,
            "straggle": args.straggle,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "device": args.device,
        },
        "cluster": {
            "workers": args.workers,
            "servers": args.servers,
            "consistency": args.consistency,
            "push_codec": args.push_codec,
            "pull_codec": args.pull_codec,
            "overlap": args.overlap,
            "shm": args.shm,
            "secure": args.secure,
            "replicas": args.replicas,
            "launcher": args.launcher,
            "ray_address": args.address,
        },
    }
    if args.block_size is not None and args.block_size < 1:
        raise ConfigError(f"--block-size must be >= 1, got {args.block_size}")
    given = {k: {f: v for f, v in d.items() if v is not None} for k, d in flags.items()}
    cfg = cfg.override(**{k: d for k, d in given.items() if d})
    if args.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    _check_device(cfg.train.device)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return train(cfg)


_NOT_OPTIONS = {"command", "func", "resume"}


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but this machine has no CUDA GPU")


def _generate(args: argparse.Namespace) -> int:
    from pslm.lm.checkpoint import load_model
    from pslm.lm.generate import stream

    _check_device(args.device)
    model, tok, _ = load_model(args.run, args.checkpoint, device=args.device)
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    ids = []
    text_so_far = ""
    for token in stream(
        model,
        prompt,
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
    ):
        ids.append(token)
        text = tok.decode(ids)  # decode the whole tail: a character may span tokens
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(text_so_far) :])
            sys.stdout.flush()
            text_so_far = text
    sys.stdout.write(tok.decode(ids)[len(text_so_far) :] + "\n")
    return 0


def _eval_classifier(args: argparse.Namespace) -> int:
    from pslm.train.finetune import evaluate_classifier
    from pslm.train.metrics import format_report

    result = evaluate_classifier(Path(args.run), checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result["model"], f"{args.run}, step {result['step']}, test split:"))
        print()
        print(format_report(result["baseline"], f"{result['baseline']['name']}:"))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from pslm.train.run import finetune

    if args.device:
        _check_device(args.device)
    flags = {
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "eval_interval": args.eval_interval,
            "seed": args.seed,
            "device": args.device,
        },
        "optim": {"lr": args.lr},
        "cluster": {
            "workers": args.workers,
            "servers": args.servers,
            "consistency": args.consistency,
        },
        "finetune": {
            "split_seed": args.split_seed,
            "folds": args.folds,
            "fold": args.fold,
            "pooling": args.pooling,
            "windows": args.windows,
        },
    }
    given = {k: {f: v for f, v in d.items() if v is not None} for k, d in flags.items()}
    overrides = {k: d for k, d in given.items() if d}
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return finetune(Path(args.run), args.data, overrides, run_dir=args.run_dir or "")


def _report(args: argparse.Namespace) -> int:
    from pslm.train.report import report

    out = report(Path(args.run))
    print(f"wrote {out}")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from pslm.lm.labelled import load_labelled
    from pslm.train.baseline import language_of, run_baseline
    from pslm.train.metrics import classification_metrics, format_report

    data = load_labelled(args.data)
    split = data.split(seed=args.seed)
    language = language_of(data.texts) if args.language == "auto" else args.language
    pos = tuple(p for p in args.pos.split(",") if p)
    result = run_baseline(split, language=language, pos=pos, stopwords=args.stopwords)
    report = classification_metrics(split.test.targets, result.predictions, data.labels)
    doc = {
        "data": data.name,
        "texts": len(data),
        "repeats_removed": data.repeats,
        "conflicting_dropped": data.dropped,
        "split": [len(split.train), len(split.val), len(split.test)],
        "language": language,
        "features": result.features,
        **report,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"{data.name}: {len(data)} texts after dedup ({data.repeats} repeats, "
            f"{data.dropped} with two labels dropped); train {len(split.train)}, val "
            f"{len(split.val)}, test {len(split.test)}; TF-IDF ({result.features} features, "
            f"{language}) + logistic regression"
        )
        print(format_report(report))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pslm.train.config import load_config
    from pslm.train.evaluate import evaluate_run

    config = Path(args.run) / "config.toml"
    if config.is_file() and load_config(config).finetune.task:
        return _eval_classifier(args)

    result = evaluate_run(args.run, iters=args.iters, checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['run']} step {result['step']}: val loss {result['val_loss']:.4f}, "
            f"perplexity {result['perplexity']:.2f} ({result['batches']} batches of "
            f"{result['tokens_per_batch']} tokens)"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pslm.demo import run_demo

    return run_demo(
        workers=args.workers, servers=args.servers, steps=args.steps, run_dir=args.run_dir
    )


def _bench(args: argparse.Namespace) -> int:
    from pslm.bench import run_bench

    return run_bench(args.name, as_json=args.json, quick=args.quick)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
