"""The Ray launcher: the local launcher's cluster, each role in a Ray actor (the ``ray`` extra).

    with RayCluster(cfg, address="auto") as cluster:     # or "local", or "ray://host:10001"
        cluster.wait()

Everything ``LocalCluster`` does - the run directory, logs, the secret, restarts of dead
servers and the scheduler, stopping every process - works the same: only where a role runs
changes. Each role command runs as a subprocess of its own Ray actor (named
``pslm-<role>-<rank>`` in the namespace ``pslm-<run directory name>``), which dies with it:
the role asks the kernel to end it when its actor's process ends. Servers are spread over the
nodes by a placement group and ask for a CPU each; workers ask for a CPU, or a GPU with
``--device cuda``. A worker actor that dies (a node lost, ``ray.kill``) is started again by
Ray, ``worker_restarts`` times, and its new process rejoins the job in its place, as with the
local launcher. The run directory must be a path every Ray node shares.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pslm.errors import ConfigError
from pslm.ps.launch.local import PARENT_ENV, LaunchConfig, LocalCluster

log = logging.getLogger("pslm.launch")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the Ray launcher needs ray: pip install 'pslm[ray]' (or pip install ray)"
        ) from None
    return ray


class RoleActor:
    """Runs one role command as a subprocess (created by ``RayCluster`` as a Ray actor)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str, append: bool):
        env = {**env, PARENT_ENV: str(os.getpid())}  # the role ends with this actor
        with open(log_path, "ab" if append else "wb") as logf:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env
            )

    def pid(self) -> int:
        return self.proc.pid

    def wait(self) -> int:
        return self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)


class ActorProcess:
    """What the launcher knows of a role running in a Ray actor: a Popen's interface."""

    def __init__(self, ray: Any, actor: Any, restarts: int):
        self.ray = ray
        self.actor = actor
        self.restarts_left = restarts
        self.pid = ray.get(actor.pid.remote())
        self.returncode: int | None = None
        self._done = actor.wait.remote()

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        ready, _ = self.ray.wait([self._done], timeout=0)
        if not ready:
            return None
        try:
            self.returncode = int(self.ray.get(self._done))
            self.ray.kill(self.actor, no_restart=True)  # its role has ended: so does it
        except self.ray.exceptions.RayActorError:  # the actor died: Ray starts it again
            if self.restarts_left <= 0:
                self.returncode = -signal.SIGKILL
                return self.returncode
            self.restarts_left -= 1
            log.warning("a Ray actor died; Ray starts it again (%d more)", self.restarts_left)
            self._done = self.actor.wait.remote()
            self.pid = self._pid()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ray actor", timeout or 0)
            self.ray.wait([self._done], timeout=0.1)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                self.ray.get(self.actor.signal.remote(int(sig)), timeout=10)
            except Exception as exc:  # noqa: BLE001 - a dead actor has nothing to signal
                log.debug("could not signal a Ray actor: %s", exc)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.ray.kill(self.actor, no_restart=True)  # its role ends with it
        self.returncode = -signal.SIGKILL if self.returncode is None else self.returncode

    def _pid(self) -> int:
        try:
            return int(self.ray.get(self.actor.pid.remote(), timeout=60))
        except Exception:  # noqa: BLE001 - it may be gone for good: poll() tells
            return -1


class RayCluster(LocalCluster):
    """``LocalCluster`` with every role in a Ray actor (see the module's description)."""

    def __init__(self, cfg: LaunchConfig, *, address: str = "auto", gpus_per_worker: float = 0):
        super().__init__(cfg)
        self.ray = _ray()
        self.address = address
        self.gpus_per_worker = gpus_per_worker
        self.started_ray = False
        self.namespace = f"pslm-{Path(cfg.run_dir).resolve().name}"
        self.group: Any = None
        self.actor_class: Any = None

    def start(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            local = self.address == "local"
            needed = 1 + self.cfg.num_servers * (1 + self.cfg.replicas) + self.cfg.num_workers
            kwargs: dict[str, Any] = {"namespace": self.namespace, "log_to_driver": False}
            if local:  # a private Ray on this machine, stopped at the end
                kwargs.update(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False)
            elif self.address.removeprefix("ray://").startswith("127."):
                kwargs["_node_ip_address"] = "127.0.0.1"  # a head on loopback: join it there
            ray.init(address=None if local else self.address, **kwargs)
            self.started_ray = True
        from ray.util.placement_group import placement_group

        servers = self.cfg.num_servers * (1 + self.cfg.replicas)
        self.group = placement_group([{"CPU": 1}] * servers, strategy="SPREAD")
        ray.get(self.group.ready(), timeout=120)
        self.actor_class = ray.remote(RoleActor)
        super().start()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.group is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.group)
                self.group = None
            if self.started_ray:
                self.ray.shutdown()
                self.started_ray = False

    def _popen(
        self,
        role: str,
        rank: int,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        again: bool,
    ) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict[str, Any] = {
            "name": f"pslm-{role}-{rank}" if not again else None,
            "namespace": self.namespace,
            "num_cpus": 0 if role == "scheduler" else 1,
            "max_concurrency": 4,  # wait() blocks; pid() and signal() still answer
        }
        restarts = 0
        if role == "server":
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.group)
        if role == "worker":
            restarts = self.cfg.restarts  # Ray starts a dead worker again; pslm takes it back
            options["max_restarts"] = restarts
            if self.gpus_per_worker:
                options["num_gpus"] = self.gpus_per_worker
        if options["name"] is None:
            del options["name"]
        env = {k: v for k, v in env.items() if k != PARENT_ENV}
        argv = [sys.executable, "-m", "pslm", *args]
        actor = self.actor_class.options(**options).remote(argv, env, str(log_path), again)
        return ActorProcess(self.ray, actor, restarts)
