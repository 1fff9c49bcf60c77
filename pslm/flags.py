"""Every ``pslm`` command's flags, and the ``PSLM_*`` environment variables they read.

Role commands read a ``PSLM_*`` variable for any flag not given (like ps-lite's ``DMLC_*``):
PSLM_SCHEDULER, PSLM_BIND, PSLM_ADVERTISE, PSLM_RANK, PSLM_TIMEOUT, PSLM_NUM_WORKERS,
PSLM_NUM_SERVERS, PSLM_REPLICAS, PSLM_RUN_DIR, PSLM_HEARTBEAT_INTERVAL, PSLM_HEARTBEAT_TIMEOUT,
PSLM_SECRET_FILE, PSLM_SECURE, PSLM_INSECURE, PSLM_THREADS, PSLM_WORKER_ARGS (and PSLM_SECRET,
the cluster secret itself, which has no flag). A variable is read only by the command that runs
(``resolve_env``), so a bad one stops only the command that needs it.

    args = parser(commands).parse_args(argv)    # commands: name -> function(args) -> int
    resolve_env(args)                           # PSLM_* defaults, read now

``pslm train`` and ``pslm finetune`` take every field of ``pslm.train.config`` as a flag made
from the field (``--optim.lr 3e-4``, ``pslm.settings``); their short flags are aliases of
those fields (``TRAIN_ALIASES``, ``FINETUNE_ALIASES``). Those flags are made when the command
runs, because the configs import torch and the role commands must start without it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pslm.errors import ConfigError

TRAIN_ALIASES = {
    "--data": "data.name",
    "--tokenizer": "data.tokenizer",
    "--model": "model.preset",
    "--block-size": "model.block_size",
    "--untie-embeddings": "not model.tie_embeddings",
    "--steps": "train.steps",
    "--batch-size": "train.batch_size",
    "--seed": "train.seed",
    "--device": "train.device",
    "--slow-worker": "train.slow_worker",
    "--straggle": "train.straggle",
    "--workers": "cluster.workers",
    "--servers": "cluster.servers",
    "--consistency": "cluster.consistency",
    "--replicas": "cluster.replicas",
    "--push-codec": "cluster.push_codec",
    "--pull-codec": "cluster.pull_codec",
    "--overlap": "cluster.overlap",
    "--no-shm": "not cluster.shm",
    "--secure": "cluster.secure",
    "--launcher": "cluster.launcher",
    "--address": "cluster.ray_address",
    "--run-dir": "run_dir",
}
"""``pslm train``'s short flags: flag -> the field it sets (``not``: a switch that sets it
false)."""

FINETUNE_ALIASES = {
    **{
        flag: TRAIN_ALIASES[flag]
        for flag in (
            "--steps",
            "--batch-size",
            "--seed",
            "--device",
            "--workers",
            "--servers",
            "--consistency",
            "--run-dir",
        )
    },
    "--lr": "optim.lr",
    "--eval-interval": "train.eval_interval",
    "--split-seed": "finetune.split_seed",
    "--folds": "finetune.folds",
    "--fold": "finetune.fold",
    "--pooling": "finetune.pooling",
    "--windows": "finetune.windows",
}
"""``pslm finetune``'s short flags."""

FINETUNE_FIXED = ("model", "data", "finetune.task", "finetune.pretrained", "finetune.labels")
"""What ``pslm finetune`` takes from the pretrained run and the labelled data, not from flags."""

SETTINGS_HELP = (
    "Every setting of pslm/train/config.py is a flag --SECTION.FIELD VALUE (--optim.lr 3e-4, "
    "--optim.betas 0.9,0.95); a true/false setting is a switch: --cluster.overlap, "
    "--no-cluster.overlap. The short flags (--workers) are aliases of fields. --print-config "
    "prints the resolved settings as TOML and starts nothing."
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that adds some of its flags when it is first used (``later``)."""

    later: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds the rest of the flags: those made from pslm.train.config, which imports torch."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def _complete(self) -> None:
        later, self.later = self.later, None
        if later:
            later(self)


def _train_settings(p: argparse.ArgumentParser) -> None:
    from pslm.settings import add_settings
    from pslm.train.config import TrainConfig

    add_settings(p, TrainConfig, aliases=TRAIN_ALIASES)


def _finetune_settings(p: argparse.ArgumentParser) -> None:
    from pslm.settings import add_settings
    from pslm.train.config import TrainConfig
    from pslm.train.finetune import DEFAULTS

    add_settings(p, TrainConfig, aliases=FINETUNE_ALIASES, defaults=DEFAULTS, skip=FINETUNE_FIXED)


def _print_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings the run would record (its config.toml) and exit",
    )


class EnvDefault:
    """A flag's default taken from a PSLM_* variable, read only by the command that runs."""

    def __init__(self, name: str, kind: Callable[[str], Any], fallback: Any):
        self.name, self.kind, self.fallback = name, kind, fallback

    def value(self) -> Any:
        return env(self.name, self.kind, self.fallback)


def resolve_env(args: argparse.Namespace) -> None:
    for key, value in vars(args).items():
        if isinstance(value, EnvDefault):
            setattr(args, key, value.value())


def env(name: str, kind: Callable[[str], Any], default: Any) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def parser(commands: Mapping[str, Callable[[argparse.Namespace], int]]) -> Parser:
    """The whole command line; ``commands``: what each command runs, by its name."""
    p = Parser(
        prog="pslm",
        description="Train GPT-style language models on a parameter server.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "train",
        help="train a GPT on a local parameter-server cluster",
        usage="%(prog)s [--config FILE.toml] [--SECTION.FIELD VALUE ...] [--print-config]\n"
        "       %(prog)s --resume RUN_DIR",
        description=SETTINGS_HELP + " Flags override --config.",
    )
    s.add_argument("--config", metavar="FILE.toml", help="settings file; flags override it")
    _print_config_arg(s)
    s.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue that run from its newest checkpoint (takes no other option)",
    )
    s.later = _train_settings
    s.set_defaults(func=commands["train"])

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
    s.set_defaults(func=commands["generate"])

    s = sub.add_parser(
        "eval", help="validation loss of a trained run; test metrics of a fine-tuned one"
    )
    s.add_argument("--run", required=True, metavar="DIR", help="run directory")
    s.add_argument("--iters", type=int, default=200, help="validation batches (200)")
    s.add_argument("--checkpoint", metavar="DIR", help="a checkpoint (default: the newest)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=commands["eval"])

    s = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained run on labelled text",
        usage="%(prog)s --run DIR --data NAME|PATH [--SECTION.FIELD VALUE ...] [--print-config]",
        description=SETTINGS_HELP + " The model, its tokenizer and [data] come from the "
        "pretrained run; [finetune] task, pretrained and labels from it and the data.",
    )
    s.add_argument("--run", required=True, metavar="DIR", help="the pretrained run")
    s.add_argument("--task", choices=["classify"], default="classify")
    s.add_argument("--data", required=True, help="bbc-news, zh-sentiment, or JSONL/CSV")
    _print_config_arg(s)
    s.later = _finetune_settings
    s.set_defaults(func=commands["finetune"])

    s = sub.add_parser("report", help="plots and a Markdown summary of a run")
    s.add_argument("--run", required=True, metavar="DIR", help="run directory")
    s.set_defaults(func=commands["report"])

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
    s.set_defaults(func=commands["baseline"])

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
    s.set_defaults(func=commands["scheduler"])

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
    s.add_argument(
        "--run-dir",
        default=EnvDefault("PSLM_RUN_DIR", str, ""),
        help="the job's run directory: checkpoints are saved and restored only inside it "
        "[PSLM_RUN_DIR, default: anywhere]",
    )
    _rank_timeout_args(s, timeout=30.0)
    _security_args(s)
    s.set_defaults(func=commands["server"])

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
    s.set_defaults(func=commands["run-worker"])

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
    s.set_defaults(func=commands["worker"])

    s = sub.add_parser("demo", help="train a small MLP on a local parameter-server cluster")
    s.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    s.add_argument("--servers", type=int, default=2, help="server processes (default 2)")
    s.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    s.add_argument("--run-dir", default="", help="run directory (default runs/demo-<time>)")
    s.set_defaults(func=commands["demo"])

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
    s.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="a host name requests may use (their Host and Origin) besides loopback, e.g. this "
        "machine's name or address when listening beyond it; repeatable",
    )
    s.add_argument("--refresh", type=float, default=1.0, help="seconds between refreshes (1)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--max-tokens", type=int, default=1024, help="limit per request (1024)")
    s.add_argument(
        "--max-inflight",
        type=int,
        default=32,
        help="generations admitted at once; more are answered 503 at once (32)",
    )
    s.add_argument(
        "--head-timeout",
        type=float,
        default=10.0,
        help="seconds a request head may take to arrive; then 408 and the connection closes (10)",
    )
    s.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive; then 408 (30)",
    )
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body; more: 413 (1 MiB)",
    )
    s.add_argument("--address-file", default="", help="write the URL here once listening")
    s.add_argument("--no-kv-cache", action="store_true", help="generate without the KV cache")
    s.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="requests computing a token at once (1: they take turns token by token)",
    )
    _security_args(s)
    s.set_defaults(func=commands["serve"])

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
    s.add_argument(
        "--operator-file",
        metavar="FILE",
        default=EnvDefault("PSLM_OPERATOR_FILE", str, None),
        help="the job's operator credential, which steering needs (default: RUN/operator)",
    )
    _security_args(s)
    s.set_defaults(func=commands["ctl"])

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
    s.set_defaults(func=commands["plan"])

    s = sub.add_parser("bench", help="run a benchmark; --json prints one JSON object last")
    s.add_argument(
        "name",
        choices=[
            *("transport", "ps", "train", "quality", "consistency", "recovery", "overlap"),
            *("serve", "launchers", "pipeline"),
        ],
        help="which benchmark",
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--quick", action="store_true", help="fewer repetitions (for smoke tests)")
    s.set_defaults(func=commands["bench"])
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
        help="encrypt all traffic (ZeroMQ CURVE, keys from the secret); beyond loopback this "
        "or --insecure is required, the same on every node [PSLM_SECURE=1]",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=EnvDefault("PSLM_INSECURE", boolean, False),
        help="send traffic beyond loopback unencrypted (a secret, if any, is still proved) "
        "[PSLM_INSECURE=1]",
    )


def boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no", ""):
        return False
    raise ValueError(raw)
