"""Local launcher: a scheduler, S servers and W workers as child processes on 127.0.0.1.

    cfg = LaunchConfig(num_servers=2, num_workers=2, worker="mypkg.train:main",
                       worker_args={"steps": 20}, run_dir="runs/demo")
    with LocalCluster(cfg) as cluster:
        cluster.wait()            # returns when every worker exited 0; LaunchError otherwise

Each worker process calls ``worker(client, **worker_args)`` with a connected ``PSClient``.
With ``worker=None`` no worker processes start: the caller connects its own clients to
``cluster.scheduler_address``.

Children log to ``run_dir/logs/<role>-<rank>.log``. They run in their own process groups, so a
Ctrl-C at the terminal reaches only the launcher, which then stops them; and they ask the
kernel to kill them if the launcher dies (PR_SET_PDEATHSIG), so no process outlives it, even
after ``kill -9``. Leaving the ``with`` block always stops every child: SIGTERM, then SIGKILL
after ``stop_timeout``.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pslm.errors import ConfigError, Diverged, LaunchError
from pslm.ps.core.protocol import SHARD_LOST
from pslm.wire import auth
from pslm.wire.auth import Security

if TYPE_CHECKING:
    from pslm.ps.client.client import ClientConfig

log = logging.getLogger("pslm.launch")

PARENT_ENV = "PSLM_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    """What the local launcher starts."""

    num_servers: int = 2
    """Server processes."""
    num_workers: int = 2
    """Workers in the cluster (processes, unless ``worker`` is None)."""
    worker: str | None = None
    """``module:function`` each worker process runs as ``function(client, **worker_args)``."""
    worker_args: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable keyword arguments for ``worker``."""
    run_dir: str = "runs/local"
    """Where ``cluster.json`` and the logs go."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats."""
    heartbeat_timeout: float = 5.0
    """Seconds of silence before a node is declared dead."""
    timeout: float = 60.0
    """Request timeout of servers and workers, in seconds."""
    threads_per_worker: int = 1
    """Intra-op threads of each worker and server (one per process is fastest on CPU)."""
    start_timeout: float = 60.0
    """Seconds to wait for the scheduler to come up."""
    stop_timeout: float = 5.0
    """Seconds between SIGTERM and SIGKILL when stopping children."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every child."""
    secret: str = ""
    """The cluster secret every node must prove (``pslm.wire.auth``); empty: a fresh random
    one for this cluster, known to the launcher and its children only."""
    secure: bool = False
    """Encrypt all traffic (ZeroMQ CURVE, keys derived from the secret)."""
    restarts: int = 0
    """How many times in all a worker process that dies is started again (it rejoins in
    place of the dead one); 0: a dead worker fails the job."""
    replicas: int = 0
    steering: str = ""
    """The job's live settings to start from (JSON; ``pslm.ps.core.steering``)."""
    """Backups per shard (0 or 1), each a server process of its own (``pslm.ps.server.loop``).
    With backups a dead server is started again (up to ``server_restarts`` times in all)
    and becomes a backup; without, a dead server fails the job."""
    server_restarts: int = 3
    """How many times in all a dead server is started again (with ``replicas``)."""
    scheduler_restarts: int = 3
    """How many times in all a dead scheduler is started again, at the same address; it takes
    the cluster over from the state the dead one kept in ``run_dir``."""

    def __post_init__(self) -> None:
        if self.num_servers < 1 or self.num_workers < 1:
            raise ConfigError("need at least one server and one worker")
        if self.worker is not None and ":" not in self.worker:
            raise ConfigError(f"worker must be 'module:function', got {self.worker!r}")
        try:
            json.dumps(self.worker_args)
        except TypeError as exc:
            raise ConfigError(f"worker_args must be JSON-serialisable: {exc}") from None
        if self.threads_per_worker < 1:
            raise ConfigError("threads_per_worker must be >= 1")
        if self.restarts < 0 or self.server_restarts < 0:
            raise ConfigError("restarts must be >= 0")
        if self.replicas not in (0, 1):
            raise ConfigError(f"replicas must be 0 or 1, got {self.replicas}")


@dataclass(slots=True)
class Child:
    role: str
    rank: int
    proc: Any
    """A ``subprocess.Popen`` (or what stands for one: ``pslm.ps.launch.ray.ActorProcess``)."""
    log_path: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.rank}" if self.role != "scheduler" else "scheduler"

    def failure(self, code: int) -> LaunchError:
        """The error for this child's exit: its last log line first, then the log's tail."""
        tail = self.tail()
        last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "no output")
        return LaunchError(
            f"{self.name} exited with code {code}: {last.removeprefix('pslm: error: ')} "
            f"(log: {self.log_path})\n{tail}"
        )

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class LocalCluster:
    """Starts and supervises a local cluster; see the module docstring."""

    def __init__(self, cfg: LaunchConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.secret = cfg.secret or secrets.token_urlsafe(32)
        self.restarts_left = cfg.restarts
        self.server_restarts_left = cfg.server_restarts if cfg.replicas else 0
        self.scheduler_restarts_left = cfg.scheduler_restarts
        self.restarted = 0
        self.lost: list[Child] = []  # workers that died with no restarts left
        self.failed: Child | None = None
        """The child whose exit failed the job, if one did."""
        self.children: list[Child] = []
        self.scheduler_address = ""
        self.added = 0  # workers started for pslm ctl add-worker
        self._next_look = 0.0

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def start(self) -> None:
        """Start the scheduler, then the servers and the worker processes."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        _write_secret(self.run_dir / SECRET_FILE, self.secret)
        # this process talks to the cluster too (tests, tools): it proves the same secret
        auth.install(Security.from_secret(self.secret, encrypt=self.cfg.secure))
        addr_file = self.run_dir / "scheduler.addr"
        addr_file.unlink(missing_ok=True)
        cfg = self.cfg
        sched = self._spawn(
            "scheduler",
            0,
            [
                "scheduler",
                "--num-workers",
                str(cfg.num_workers),
                "--num-servers",
                str(cfg.num_servers),
                "--bind",
                "tcp://127.0.0.1:*",
                "--run-dir",
                str(self.run_dir),
                "--address-file",
                str(addr_file),
                "--heartbeat-interval",
                str(cfg.heartbeat_interval),
                "--heartbeat-timeout",
                str(cfg.heartbeat_timeout),
                "--replicas",
                str(cfg.replicas),
                *(["--steering", cfg.steering] if cfg.steering else []),
            ],
        )
        self.scheduler_address = self._await_address(sched, addr_file)
        for r in range(cfg.num_servers * (1 + cfg.replicas)):  # the backups after the servers
            self._spawn(
                "server",
                r,
                [
                    "server",
                    "--scheduler",
                    self.scheduler_address,
                    "--rank",
                    str(r),
                    "--bind",
                    "tcp://127.0.0.1:*",
                    "--timeout",
                    str(cfg.timeout),
                    "--run-dir",
                    str(self.run_dir),
                ],
            )
        if cfg.worker is not None:
            for r in range(cfg.num_workers):
                self._spawn(
                    "worker",
                    r,
                    ["run-worker", cfg.worker],
                    env={
                        "PSLM_SCHEDULER": self.scheduler_address,
                        "PSLM_RANK": str(r),
                        "PSLM_TIMEOUT": str(cfg.timeout),
                        "PSLM_WORKER_ARGS": json.dumps(cfg.worker_args),
                    },
                )

    def poll(self) -> bool:
        """True once the job is done: every worker process exited 0 (without worker processes:
        the scheduler exited). Raises LaunchError, after stopping everything, if a child failed.
        """
        self._check_children()
        return all(c.proc.poll() is not None for c in self._job())

    def wait(self, timeout: float | None = None) -> None:
        """Block until the job is done and the cluster has shut itself down.

        Raises LaunchError (with the tail of the child's log) as soon as any child fails, and
        after ``timeout`` seconds if given. A child still running ``heartbeat_timeout`` + 10 s
        after the job is stopped (a warning, not a failure).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"the cluster did not finish within {timeout:g} s")
            running = next((c for c in self._job() if c.proc.poll() is None), None)
            if running is not None:  # it may have ended since poll()
                with suppress(subprocess.TimeoutExpired):
                    running.proc.wait(0.1)
        grace = time.monotonic() + self.cfg.heartbeat_timeout + 10.0
        late: list[Child] = []
        for c in self.children:  # the scheduler stops the servers once the workers finalized
            with suppress(subprocess.TimeoutExpired):
                c.proc.wait(max(0.0, grace - time.monotonic()))
            if c.proc.poll() is None:
                log.warning("%s did not exit after the job; stopping it", c.name)
                late.append(c)
        self._check_children()  # before the stop: the signal it ends by is no failure
        self._terminate(late)

    def stop(self) -> None:
        """Stop every child still running: SIGTERM, then SIGKILL after ``stop_timeout``."""
        self._terminate(self.children)

    def _terminate(self, children: list[Child]) -> None:
        alive = [c for c in children if c.proc.poll() is None]
        for c in alive:
            with suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_timeout
        for c in alive:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    c.proc.kill()
                c.proc.wait()

    def _add_workers(self) -> None:
        """Start the workers ``pslm ctl add-worker`` asked for (the scheduler counts them in
        cluster.json); each takes the rank of a removed or dead worker."""
        if time.monotonic() < self._next_look or self.cfg.worker is None:
            return
        self._next_look = time.monotonic() + 1.0
        try:
            wanted = int(json.loads((self.run_dir / "cluster.json").read_text())["add_workers"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        template = next((c for c in self.children if c.role == "worker"), None)
        while self.added < wanted and template is not None:
            self.added += 1
            log.warning("starting a worker in place of a removed or dead one (pslm ctl)")
            rank = self.cfg.num_workers + self.added - 1  # names its log; it asks for any rank
            self._spawn("worker", rank, template.args, {**template.env, "PSLM_RANK": "-1"})

    def _check_children(self) -> None:
        self._add_workers()
        for i, c in enumerate(self.children):
            code = c.proc.poll()
            if code is None or code == 0:
                continue
            if c.role == "worker" and self.restarts_left > 0 and code != Diverged.exit_code:
                self.restarts_left -= 1
                self.restarted += 1
                log.warning("%s exited with code %d; starting it again", c.name, code)
                self.children[i] = self._spawn(c.role, c.rank, c.args, c.env, again=True)
                continue
            if c.role == "scheduler" and self.scheduler_restarts_left > 0 and code != SHARD_LOST:
                self.scheduler_restarts_left -= 1
                self.restarted += 1
                log.warning("the scheduler exited with code %d; starting it again", code)
                args = _with_flag(c.args, "--bind", self.scheduler_address)
                if "--recover" not in args:
                    args.append("--recover")
                self.children[i] = self._spawn(c.role, c.rank, args, c.env, again=True)
                continue
            if c.role == "server" and self.server_restarts_left > 0:
                self.server_restarts_left -= 1  # it comes back as a backup
                self.restarted += 1
                log.warning("%s exited with code %d; starting it again", c.name, code)
                self.children[i] = self._spawn(c.role, c.rank, c.args, c.env, again=True)
                continue
            if c.role == "server" and self.cfg.replicas:
                # its backup serves its shard; without one, the workers fail the job
                log.warning("%s exited with code %d; its backup takes over", c.name, code)
                self.lost.append(self.children.pop(i))
                return self._check_children()
            if (
                c.role == "worker"
                and self.cfg.restarts
                and code != Diverged.exit_code  # the others would diverge alike: the job ends
                and any(w.proc.poll() is None for w in self._job() if w is not c)
            ):  # no restarts left: the others train its share to the end
                log.warning("%s exited with code %d; the others train its share", c.name, code)
                self.lost.append(self.children.pop(i))
                return self._check_children()
            self.failed = c
            self.stop()
            raise c.failure(code)

    def _job(self) -> list[Child]:
        workers = [c for c in self.children if c.role == "worker"]
        return workers or [c for c in self.children if c.role == "scheduler"]

    def _spawn(
        self,
        role: str,
        rank: int,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        again: bool = False,
    ) -> Child:
        log_path = (
            self.run_dir
            / "logs"
            / (f"{role}-{rank}.log" if role != "scheduler" else "scheduler.log")
        )
        child_env = {
            **os.environ,
            **_thread_env(self.cfg.threads_per_worker),
            **self.cfg.env,
            **(env or {}),
            PARENT_ENV: str(os.getpid()),
            "PSLM_SECRET": self.secret,  # the environment: readable by this user alone
            "PSLM_SECURE": "1" if self.cfg.secure else "0",
        }
        child_env.pop("PSLM_SECRET_FILE", None)
        # (its children bind and connect on loopback only: PSLM_SECURE above is their whole
        # choice, and an inherited PSLM_INSECURE=1 would contradict PSLM_SECURE=1)
        child_env.pop("PSLM_INSECURE", None)
        proc = self._popen(role, rank, args, child_env, log_path, again)
        child = Child(role, rank, proc, log_path, args, dict(env or {}))
        if not again:
            self.children.append(child)
        return child

    def _popen(
        self,
        role: str,
        rank: int,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        again: bool,
    ) -> Any:
        """Start ``pslm ARGS`` (a Popen; ``pslm.ps.launch.ray`` starts it in a Ray actor)."""
        with open(log_path, "ab" if again else "wb") as logf:
            return subprocess.Popen(
                [sys.executable, "-m", "pslm", *args],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
            )

    def _await_address(self, sched: Child, addr_file: Path) -> str:
        deadline = time.monotonic() + self.cfg.start_timeout
        while not addr_file.exists():
            if sched.proc.poll() is not None:
                raise sched.failure(sched.proc.returncode)
            if time.monotonic() > deadline:
                raise LaunchError(f"the scheduler did not start within {self.cfg.start_timeout} s")
            with suppress(subprocess.TimeoutExpired):
                sched.proc.wait(0.05)
        return addr_file.read_text().strip()


SECRET_FILE = "secret"
"""In the run directory, readable by its owner alone: the cluster secret, for tools that
attach to the running cluster (``pslm serve --scheduler``, ``pslm ctl``)."""


def _write_secret(path: Path, secret: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)


def _with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced by ``value``."""
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _thread_env(n: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "PSLM_THREADS": str(n)}


def supervise_self() -> None:
    """In a child of the launcher: die with the launcher, whatever kills it.

    Called first thing by every pslm role command. A no-op unless started by a launcher.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        os._exit(1)


def run_worker(target: str, client_cfg: ClientConfig, args: dict[str, Any]) -> None:
    """Connect a PSClient and call ``target`` ("module:function") as ``function(client, **args)``.

    The client finalizes when the function returns, and only then.
    """
    from pslm.ps.client.client import PSClient  # here: the launcher itself needs no torch

    module_name, _, func_name = target.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load worker function {target!r}: {exc}") from None
    with PSClient(client_cfg) as client:
        func(client, **args)
