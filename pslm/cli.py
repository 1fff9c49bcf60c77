"""The ``pslm`` command line: parse, build a config, call one function.

Each command is a function here (``COMMANDS``); its flags, and the ``PSLM_*`` environment
variables role commands read for flags not given, are in ``pslm.flags``.
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
from typing import TYPE_CHECKING, Any

from pslm.errors import ConfigError, PSLMError
from pslm.flags import env, parser, resolve_env

if TYPE_CHECKING:  # the configs import torch, which role commands must not wait for
    from pslm.train.config import TrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser(COMMANDS).parse_args(argv)
        resolve_env(args)
        return int(args.func(args) or 0)
    except PSLMError as exc:
        print(f"pslm: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pslm: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The first line of an error: errors put what went wrong and what to do there."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def _check_encryption(args: argparse.Namespace, *addresses: str) -> str:
    """Off loopback, traffic is encrypted unless a flag says otherwise: the first of
    ``addresses`` (bound or connected to) beyond loopback ("" if none); ConfigError if there is
    one and neither --secure nor --insecure says how to talk there. Refused rather than
    turned on here alone: every node of a cluster must speak CURVE, or none."""
    if args.secure and args.insecure:
        raise ConfigError("--secure and --insecure contradict each other: give one of them")
    far = next((a for a in addresses if a and not _loopback(a)), "")
    if far and not (args.secure or args.insecure):
        raise ConfigError(
            f"{far} is beyond loopback: pass --secure to encrypt (with the cluster secret, on "
            "every node) or --insecure to send in clear [PSLM_SECURE=1 or PSLM_INSECURE=1]"
        )
    return far


def _loopback(address: str) -> bool:
    """Whether ``address`` (host:port, tcp://host:port, ipc://, inproc://) stays on this
    machine: 127.0.0.0/8, ::1 or localhost. A host name, an interface or ``*`` may not."""
    import ipaddress

    scheme, _, rest = address.partition("://") if "://" in address else ("tcp", "", address)
    if scheme != "tcp":
        return scheme in ("ipc", "inproc")
    host = (rest.rpartition(":")[0] or rest).removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _role_setup(role: str, args: argparse.Namespace, *, threads: bool = True) -> None:
    from pslm.ps.launch.local import supervise_self
    from pslm.wire import auth
    from pslm.wire.transport import tune_allocator

    bind = str(getattr(args, "bind", "") or "")
    far = _check_encryption(args, bind, str(getattr(args, "scheduler", "") or ""))
    security = _security(args)
    supervise_self()
    tune_allocator()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {role} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    auth.install(security.as_role(role) if security is not None else None)
    if far and args.insecure:
        logging.getLogger("pslm").warning("%s is beyond loopback: traffic is not encrypted", far)
    if security is None and bind and not _loopback(bind):
        logging.getLogger("pslm").warning(
            "listening on %s without a cluster secret: anyone who reaches it can join", bind
        )
    n = env("PSLM_THREADS", int, None)
    if threads and n:
        import torch

        torch.set_num_threads(n)


def _require(value: Any, flag: str, env: str) -> Any:
    if value is None:
        raise ConfigError(f"{flag} is required (or set {env})")
    return value


def _operator(args: argparse.Namespace) -> str:
    """The operator credential steering needs: --operator-file, or the run's own."""
    from pslm.ps.core import operator

    if args.operator_file:
        return operator.read_file(Path(args.operator_file))
    if not args.run:
        raise ConfigError(
            "steering needs the operator credential: give --run DIR or --operator-file"
        )
    return operator.read(args.run)


def _attach(args: argparse.Namespace, run: str | None, role: str = "operator") -> str:
    """The scheduler address of a live cluster: --scheduler, or the run's own (the address
    and secret a local `pslm train` keeps in its run directory); installs the secret."""
    from pslm.wire import auth
    from pslm.wire.transport import tcp_address

    scheduler = args.scheduler or ""
    if not scheduler:
        if not run:
            raise ConfigError("give --scheduler ADDR or --run DIR")
        try:
            scheduler = (Path(run) / "scheduler.addr").read_text().strip()
        except OSError:
            raise ConfigError(f"{run} has no scheduler.addr: is its cluster up?") from None
    try:  # (host:port as the role commands take it)
        scheduler = tcp_address(scheduler)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_encryption(args, scheduler)
    own = Path(run or "") / "secret"
    if run and not args.secret_file and not os.environ.get("PSLM_SECRET") and own.is_file():
        args.secret_file = str(own)
    security = _security(args)
    auth.install(security.as_role(role) if security is not None else None)
    return scheduler


def _ctl(args: argparse.Namespace) -> int:
    from pslm.ps.core import operator
    from pslm.ps.core.steering import parse_assignments
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
    channel = Channel(timeout=10.0, role="operator")
    try:
        channel.connect("scheduler", scheduler)
        if args.action == "status":
            body = channel.request("scheduler", Message("status")).body
        else:
            body = {"action": args.action, "values": values, "node": node}
            body[operator.FIELD] = _operator(args)
            body = channel.request("scheduler", Message("ctl", body=body)).body
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
        scheduler = _attach(args, args.run, role="reader")
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
            allowed_hosts=tuple(h.lower() for h in args.allow_host or ()),
            max_inflight=args.max_inflight,
            head_timeout=args.head_timeout,
            body_timeout=args.body_timeout,
            max_body_bytes=args.max_body_bytes,
        )
    )


def _scheduler(args: argparse.Namespace) -> int:
    from pslm.ps.control.scheduler import Scheduler, SchedulerConfig

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
    from pslm.ps.server.loop import ServerConfig, serve

    cfg = ServerConfig(
        scheduler=_require(args.scheduler, "--scheduler", "PSLM_SCHEDULER"),
        bind=args.bind,
        advertise=args.advertise,
        rank=args.rank,
        timeout=args.timeout,
        run_dir=args.run_dir,
    )
    _role_setup("server", args)
    return serve(cfg)


def _run_worker(args: argparse.Namespace) -> int:
    from pslm.ps.client.client import ClientConfig
    from pslm.ps.launch.local import run_worker

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
    from pslm.ps.client.client import ClientConfig
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
    from pslm.settings import given, overrides
    from pslm.train.config import TrainConfig, dump_toml, load_config
    from pslm.train.run import recorded, resume, train

    settings = given(args)
    if args.resume:
        options = [k for k, v in vars(args).items() if v not in (None, False)]
        flags = ["--" + k.replace("_", "-") for k in options if k not in _NOT_OPTIONS]
        if extra := [*flags, *(s.flag for s in settings.values())]:
            names = ", ".join(sorted(extra))
            raise ConfigError(f"--resume continues a run as it was set up; drop {names}")
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return resume(Path(args.resume))

    block = settings.get("model.block_size")  # the short flag has no "0: the preset's"
    if block and block.flag == "--block-size" and block.value < 1:
        raise ConfigError(f"--block-size must be >= 1, got {block.value}")
    cfg = load_config(args.config) if args.config else TrainConfig()
    cfg = _overridden(cfg, overrides(args))
    if args.print_config:
        sys.stdout.write(dump_toml(recorded(cfg).to_dict()))
        return 0
    _check_device(cfg.train.device)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return train(cfg)


_NOT_OPTIONS = {"command", "func", "resume", "settings"}


def _overridden(cfg: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """``cfg`` with the settings ``given`` (nested as ``pslm.settings.overrides`` returns
    them): sections through ``override``, top-level fields replaced."""
    sections = {k: v for k, v in given.items() if isinstance(v, dict)}
    top = {k: v for k, v in given.items() if not isinstance(v, dict)}
    return dataclasses.replace(cfg.override(**sections), **top)


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
    from pslm.settings import given, overrides
    from pslm.train.config import dump_toml
    from pslm.train.run import finetune, finetune_config

    sections = overrides(args)
    run_dir = sections.pop("run_dir", "")
    if args.print_config:
        cfg = finetune_config(Path(args.run), args.data, sections, run_dir=run_dir)
        sys.stdout.write(dump_toml(cfg.to_dict()))
        return 0
    if device := given(args).get("train.device"):
        _check_device(device.value)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return finetune(Path(args.run), args.data, sections, run_dir=run_dir)


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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "generate": _generate,
    "eval": _eval,
    "finetune": _finetune,
    "report": _report,
    "baseline": _baseline,
    "scheduler": _scheduler,
    "server": _server,
    "run-worker": _run_worker,
    "worker": _worker,
    "demo": _demo,
    "serve": _serve,
    "ctl": _ctl,
    "plan": _plan,
    "bench": _bench,
}
"""What each command runs (``pslm.flags`` has their flags)."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
