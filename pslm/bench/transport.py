"""``pslm bench transport``: raw pyzmq throughput vs pslm push+pull of the same bytes.

N bytes of parameters, split evenly over S peer processes, zero-copy frames of <= 16 MiB.

pslm: a local cluster with S servers and this process as its only worker, N bytes of parameters
as 12 equal fp32 tensors (like a small model's layers; 4 MiB chunks spread over the servers) in
the storage ``PSClient.allocate`` gives them, as a pslm worker keeps its parameters and
gradients (so ``push_pull`` follows its plan, as in training); SGD with lr 0; each step is one
``push_pull``: gradients up, the server's update, parameters down and copied into the caller's
tensors. Throughput = 2N / time. Over the socket
(``shm=False``), as between machines: this is the network path the raw baselines measure.

Raw, three baselines with S plain pyzmq processes:
- one-way: N bytes sent, each peer acknowledges with an empty frame; throughput = N / time.
- echo: N bytes sent, each peer answers with as many bytes from a buffer of its own (zero-copy):
  the same traffic as a push_pull, with nothing done to it; throughput = 2N / time.
- floor: echo plus the memory passes a push_pull cannot do without, in plain torch and no pslm
  code: each peer runs the same fused SGD kernel over the received gradient into its own
  parameters and answers with them; this process copies the answers into its tensors. Its
  ratio to raw one-way estimates how close to raw any implementation can come here (a
  reference, not a strict bound), and pslm / floor is what pslm's own code costs.

Where a step's time goes: ``floor_peer_ms`` is the median time a floor peer takes from
receiving the gradient to answering, ``pslm_server_ms`` the same for pslm's servers (their
``held_s``: from the push's receipt, decoded, to the reply); the rest of a step is the
transfers and the sender's own work.

pslm secure: the same push_pull on a cluster started with ``secure`` (ZeroMQ CURVE: every byte
encrypted), to show what encryption costs.

pslm shm: the same push_pull through shared memory (``PSClient.init``'s default when worker and
servers share a machine, ``pslm.ps.client.shm``), to show what the same-machine path saves.

CPU: ``*_cpu_ms`` is the CPU time (user and system, every thread) that this process and the
peers, or the servers, use together per step of a contender, read from ``/proc`` (Linux);
``*_cores`` is that over the step's wall time: how many cores the contender keeps busy. Near
the machine's core count a contender is bound by the work itself (mostly memory copies), and
only less work, not better overlap, makes it faster.

Medians over repetitions, the contenders measured in turn in one run; ratios are pslm / raw.
"""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from pslm.ps.client.client import ClientConfig, PSClient
from pslm.ps.core.optim import OptimizerConfig
from pslm.ps.launch.local import LaunchConfig, LocalCluster
from pslm.wire.frames import tensor_to_frames

SIZES = {"3MiB": 3 << 20, "100MiB": 100 << 20}
TENSORS = 12
ECHO = """
import ctypes, struct, time, zmq
import torch
torch.set_num_threads(1)
libc = ctypes.CDLL(None)  # the allocator settings pslm uses (tune_allocator), for fairness
libc.mallopt(-3, 32 << 20), libc.mallopt(-1, 1 << 30), libc.mallopt(-2, 64 << 20)
s = zmq.Context().socket(zmq.ROUTER)
s.setsockopt(zmq.LINGER, 0)
print(s.bind_to_random_port("tcp://127.0.0.1"), flush=True)
replies = {}
while True:
    frames = s.recv_multipart(copy=False)
    start = time.perf_counter()
    mode = frames[1].bytes
    if len(frames) == 2 and mode == b"stop":
        break
    sizes = tuple(len(f.buffer) for f in frames[2:])
    if sizes not in replies:
        replies[sizes] = [torch.zeros(n // 4) for n in sizes]
    params = replies[sizes]
    if mode == b"update":  # SGD, lr 0, as the pslm servers run it
        grads = [torch.frombuffer(f.buffer, dtype=torch.float32) for f in frames[2:]]
        torch._fused_sgd_(params, grads, [], weight_decay=0.0, momentum=0.0, lr=0.0,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
    if mode == b"ack":
        s.send_multipart([frames[0], b""])
    else:  # with the seconds from receipt to this reply (as pslm's held_s)
        held = struct.pack("<d", time.perf_counter() - start)
        s.send_multipart([frames[0], held, *[p.numpy() for p in params]], copy=False)
"""


def run(*, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    reps = 5 if quick else 40
    rows = []
    for servers in (1, 2):
        with (
            _Receivers(servers) as raw,
            _Cluster(servers) as ps,
            _Cluster(servers, secure=True) as secure,
            _Cluster(servers, shm=True) as shared,
        ):
            for label, nbytes in SIZES.items():
                n = reps if nbytes < (16 << 20) else max(3, reps // 2)
                raw.held.clear()
                ps.held.clear()
                contenders = [
                    (raw.prepare(nbytes, "ack"), raw.pids),
                    (raw.prepare(nbytes, "echo"), raw.pids),
                    (raw.prepare(nbytes, "update"), raw.pids),
                    (ps.prepare(nbytes), ps.pids),
                    (secure.prepare(nbytes), secure.pids),
                    (shared.prepare(nbytes), shared.pids),
                ]
                times, cpu = in_turn(contenders, n)
                one_way, echo, floor, step, secure_step, shm_step = times
                gbps = {
                    "one_way": nbytes / one_way / 1e9,
                    "echo": 2 * nbytes / echo / 1e9,
                    "floor": 2 * nbytes / floor / 1e9,
                    "pslm": 2 * nbytes / step / 1e9,
                    "secure": 2 * nbytes / secure_step / 1e9,
                    "shm": 2 * nbytes / shm_step / 1e9,
                }
                rows.append(
                    {
                        "servers": servers,
                        "size": label,
                        "raw_one_way_GBps": round(gbps["one_way"], 3),
                        "raw_echo_GBps": round(gbps["echo"], 3),
                        "floor_GBps": round(gbps["floor"], 3),
                        "floor_step_ms": round(floor * 1e3, 2),
                        "floor_peer_ms": _median_ms(raw.held),
                        "pslm_GBps": round(gbps["pslm"], 3),
                        "pslm_step_ms": round(step * 1e3, 2),
                        "pslm_server_ms": _median_ms(ps.held),
                        "pslm_secure_GBps": round(gbps["secure"], 3),
                        "secure_vs_pslm": round(gbps["secure"] / gbps["pslm"], 3),
                        "pslm_shm_GBps": round(gbps["shm"], 3),
                        "pslm_shm_step_ms": round(shm_step * 1e3, 2),
                        "shm_vs_pslm": round(gbps["shm"] / gbps["pslm"], 3),
                        "one_way_cpu_ms": round(cpu[0] * 1e3, 2),
                        "floor_cpu_ms": round(cpu[2] * 1e3, 2),
                        "pslm_cpu_ms": round(cpu[3] * 1e3, 2),
                        "one_way_cores": round(cpu[0] / one_way, 2),
                        "floor_cores": round(cpu[2] / floor, 2),
                        "pslm_cores": round(cpu[3] / step, 2),
                        "vs_one_way": round(gbps["pslm"] / gbps["one_way"], 3),
                        "vs_echo": round(gbps["pslm"] / gbps["echo"], 3),
                        "floor_vs_one_way": round(gbps["floor"] / gbps["one_way"], 3),
                        "vs_floor": round(gbps["pslm"] / gbps["floor"], 3),
                    }
                )
    return {
        "bench": "transport",
        "rows": rows,
        "min_vs_one_way": min(r["vs_one_way"] for r in rows),
        "min_vs_echo": min(r["vs_echo"] for r in rows),
        "min_floor_vs_one_way": min(r["floor_vs_one_way"] for r in rows),
    }


def in_turn(
    contenders: list[tuple[Any, Callable[[], list[int]]]], reps: int
) -> tuple[list[float], list[float]]:
    """Each contender's (function, the processes it runs in besides this one) called in turn
    ``reps`` times after two warm-ups (the first large messages fault pages in): the median
    seconds of a call, and the mean CPU seconds a call took in all those processes."""
    times: list[list[float]] = [[] for _ in contenders]
    cpu = [0.0 for _ in contenders]
    for rep in range(reps + 2):
        for i, (fn, pids) in enumerate(contenders):
            procs = [os.getpid(), *pids()]
            before = _cpu_s(procs)
            times[i].append(_timed(fn))
            if rep >= 2:
                cpu[i] += _cpu_s(procs) - before
    return [statistics.median(t[2:]) for t in times], [c / reps for c in cpu]


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user and system, all threads) the processes ``pids`` have used so far;
    0 for a process that is gone or where there is no ``/proc``."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def _median_ms(held: list[float]) -> float:
    """The median of per-step server times (the longest of a step's servers), in ms."""
    return round(statistics.median(held) * 1e3, 3) if held else 0.0


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def start_peers(script: str, n: int) -> tuple[list[subprocess.Popen[str]], list[zmq.Socket[Any]]]:
    """``n`` Python processes running ``script`` (which binds a ROUTER on 127.0.0.1 and prints
    its port) and a DEALER connected to each; if one fails to start, all are stopped."""
    procs: list[subprocess.Popen[str]] = []
    socks: list[zmq.Socket[Any]] = []
    try:
        for _ in range(n):
            proc = subprocess.Popen(
                [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
            )
            procs.append(proc)
            assert proc.stdout is not None
            sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{int(proc.stdout.readline())}")
            socks.append(sock)
    except BaseException:
        for proc in procs:
            proc.kill()
        for sock in socks:
            sock.close()
        raise
    return procs, socks


def stop_peers(procs: list[subprocess.Popen[str]], socks: list[zmq.Socket[Any]]) -> None:
    """Tell the peers of ``start_peers`` to stop (a ``stop`` message), and wait for them."""
    for sock in socks:
        sock.send(b"stop")
        sock.close(linger=1000)  # (the sockets' LINGER 0 would drop the stop)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Receivers:
    """``n`` plain pyzmq peers; ``prepare`` returns one delivery of nbytes (echoed back or
    acknowledged)."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen[str]] = []
        self.socks: list[zmq.Socket[Any]] = []
        self.held: list[float] = []
        """Per floor step: the longest any peer took from receipt to reply."""

    def __enter__(self) -> _Receivers:
        self.procs, self.socks = start_peers(ECHO, self.n)
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def prepare(self, nbytes: int, mode: str) -> Any:
        """``mode``: ``ack`` (one-way), ``echo``, or ``update`` (the floor: the peers update
        and answer, the answers are copied into this process's tensors)."""
        grads = torch.ones(nbytes // 4)
        out = torch.zeros(nbytes // 4)
        share = grads.numel() // self.n
        parts = [grads[i * share : (i + 1) * share] for i in range(self.n)]
        outs = [out[i * share : (i + 1) * share] for i in range(self.n)]
        frames = [tensor_to_frames(p) for p in parts]
        tag = mode.encode()
        copy = mode == "update"

        def send() -> None:
            for s, fr in zip(self.socks, frames, strict=True):
                s.send_multipart([tag, *fr], copy=False)
            held = 0.0
            for s, o in zip(self.socks, outs, strict=True):
                reply = s.recv_multipart(copy=False)
                if copy:  # as pslm fills the caller's tensors
                    held = max(held, struct.unpack("<d", reply[0].bytes)[0])
                    at = 0
                    for f in reply[1:]:
                        got = torch.frombuffer(f.buffer, dtype=torch.float32)
                        o[at : at + got.numel()].copy_(got)
                        at += got.numel()
            if copy:
                self.held.append(held)

        return send

    def __exit__(self, *exc: object) -> None:
        stop_peers(self.procs, self.socks)


class _Cluster:
    """A local cluster with ``n`` servers; ``prepare(nbytes)`` returns one push_pull step.

    Each ``prepare`` starts a fresh cluster (a server holds one model); the last is stopped
    on exit.
    """

    def __init__(self, n: int, *, secure: bool = False, shm: bool = False):
        self.n = n
        self.secure = secure
        self.shm = shm
        self.tmp = tempfile.TemporaryDirectory(prefix="pslm-bench-")
        self.cluster: LocalCluster | None = None
        self.client: PSClient | None = None
        self.held: list[float] = []
        """Per step: the servers' ``held_s`` (receipt of the push to the reply)."""

    def __enter__(self) -> _Cluster:
        return self

    def prepare(self, nbytes: int) -> Any:
        self._stop()
        cfg = LaunchConfig(
            num_servers=self.n,
            num_workers=1,
            worker=None,
            run_dir=f"{self.tmp.name}/{nbytes}",
            secure=self.secure,
        )
        self.cluster = LocalCluster(cfg).__enter__()
        client = self.client = PSClient(ClientConfig(scheduler=self.cluster.scheduler_address))
        n = nbytes // 4
        parts = -(-n // TENSORS)
        initial = {f"t{i}": t for i, t in enumerate(torch.zeros(n).split(parts))}
        client.init(initial, OptimizerConfig(name="sgd", lr=0.0), shm=self.shm)
        # the storage a worker gives its parameters and gradients (pslm.train.worker does)
        out, grads = client.allocate(), client.allocate()
        for g in grads.values():
            g.fill_(1.0)
        if self.shm and (client.memory is None or len(client.memory.active) != self.n):
            raise RuntimeError("the servers did not take shared memory")
        clock = iter(range(1 << 62))

        def step() -> None:
            self.held.append(client.wait(client.push_pull(grads, out, clock=next(clock))).held_s)

        return step

    def pids(self) -> list[int]:
        """The servers' processes (the scheduler's too: it is idle during a step)."""
        return self.cluster.pids if self.cluster is not None else []

    def _stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.wait(timeout=60)
            self.cluster.stop()
            self.cluster = None

    def __exit__(self, *exc: object) -> None:
        try:
            self._stop()
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            self.tmp.cleanup()
