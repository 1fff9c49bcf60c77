"""``pslm bench pipeline``: how close to raw pyzmq a push_pull could come with overlap.

A reference for ``pslm bench transport``, with no pslm code in it. The floor there does, in a
chain, what no push_pull can skip: the gradient over, the SGD kernel (lr 0), the parameters
back, their copy into the caller's tensors (frames of at most 16 MiB, as pslm sends). Here
the same work is cut into k messages per peer, so its links can overlap inside one step:

- ``pipe k``: a peer updates and answers each message as it arrives;
- ``late k``: a peer waits for all k, then updates and answers them one by one (an update that
  needs the whole push before it starts, as BSP's does);

and the worker sends the peers' i-th messages side by side and copies each answer into its
tensors as it arrives, from whichever peer. ``pipe1`` is the floor.
Each is measured in turn with raw one-way (N bytes sent, an empty acknowledgement); ratios are
(2N / step) / (N / one-way step), as in ``pslm bench transport``. Medians over repetitions.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from typing import Any

import torch
import zmq

from pslm.bench.transport import in_turn, start_peers, stop_peers
from pslm.wire.frames import tensor_to_frames
from pslm.wire.message import MAX_FRAME
from pslm.wire.transport import tune_allocator

SIZES = {"3MiB": 3 << 20, "100MiB": 100 << 20}
SPLITS = (1, 2, 4, 8)
PEER = """
import ctypes, struct, zmq
import torch
torch.set_num_threads(1)
libc = ctypes.CDLL(None)  # the allocator settings pslm uses (tune_allocator)
libc.mallopt(-3, 32 << 20), libc.mallopt(-1, 1 << 30), libc.mallopt(-2, 64 << 20)
s = zmq.Context().socket(zmq.ROUTER)
s.setsockopt(zmq.LINGER, 0)
print(s.bind_to_random_port("tcp://127.0.0.1"), flush=True)
params = {}
held = []

def answer(peer, key, frames):
    if key not in params:
        params[key] = [torch.zeros(len(f.buffer) // 4) for f in frames]
    grads = [torch.frombuffer(f.buffer, dtype=torch.float32) for f in frames]
    torch._fused_sgd_(params[key], grads, [], weight_decay=0.0, momentum=0.0, lr=0.0,
                      dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
    s.send_multipart([peer, *[p.numpy() for p in params[key]]], copy=False)

while True:
    frames = s.recv_multipart(copy=False)
    mode = frames[1].bytes
    if mode == b"stop":
        break
    if mode == b"ack":
        s.send_multipart([frames[0], b""])
        continue
    i, k = struct.unpack("<ii", frames[2].bytes)
    key = (tuple(len(f.buffer) for f in frames[3:]), k, i)
    if mode == b"pipe":
        answer(frames[0], key, frames[3:])
        continue
    held.append((frames[0], key, frames[3:]))
    if len(held) == k:
        for h in held:
            answer(*h)
        held = []
"""


def run(*, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    tune_allocator()  # as a pslm process does (the peers too), so received frames reuse memory
    reps = 5 if quick else 40
    rows = []
    for servers in (1, 2):
        with _Peers(servers) as peers:
            for label, nbytes in SIZES.items():
                n = reps if nbytes < (16 << 20) else max(3, reps // 2)
                contenders = {"one_way": peers.one_way(nbytes)}
                for k in SPLITS:
                    contenders[f"pipe{k}"] = peers.exchange(nbytes, k, late=False)
                    if k > 1:
                        contenders[f"late{k}"] = peers.exchange(nbytes, k, late=True)
                medians, _ = in_turn([(fn, list) for fn in contenders.values()], n)
                times = dict(zip(contenders, medians, strict=True))
                row: dict[str, Any] = {"servers": servers, "size": label}
                row["raw_one_way_GBps"] = round(nbytes / times["one_way"] / 1e9, 3)
                for name, t in times.items():
                    if name != "one_way":
                        row[name] = round(2 * times["one_way"] / t, 3)
                rows.append(row)
    return {"bench": "pipeline", "rows": rows}


class _Peers:
    """``n`` plain pyzmq peer processes (``PEER``), each holding an equal share."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen[str]] = []
        self.socks: list[zmq.Socket[Any]] = []

    def __enter__(self) -> _Peers:
        self.procs, self.socks = start_peers(PEER, self.n)
        return self

    def _shares(self, t: torch.Tensor) -> list[torch.Tensor]:
        size = t.numel() // self.n
        return [t[i * size : (i + 1) * size] for i in range(self.n)]

    def one_way(self, nbytes: int) -> Callable[[], None]:
        grads = self._shares(torch.ones(nbytes // 4))
        frames: list[list[Any]] = [[b"ack", *tensor_to_frames(g)] for g in grads]

        def send() -> None:
            for sock, fr in zip(self.socks, frames, strict=True):
                sock.send_multipart(fr, copy=False)
            for sock in self.socks:
                sock.recv_multipart()

        return send

    def exchange(self, nbytes: int, k: int, *, late: bool) -> Callable[[], None]:
        """One step: each peer's share of the gradient in ``k`` messages; each answer copied
        into its span of ``out`` as it arrives."""
        tag = b"late" if late else b"pipe"
        grads, out = torch.ones(nbytes // 4), torch.zeros(nbytes // 4)
        per_peer: list[list[tuple[list[Any], tuple[torch.Tensor, ...]]]] = []
        for g, o in zip(self._shares(grads), self._shares(out), strict=True):
            size = -(-g.numel() // k)
            pieces = list(zip(g.split(size), o.split(size), strict=True))
            head = [struct.pack("<ii", i, len(pieces)) for i in range(len(pieces))]
            per_peer.append(
                [
                    ([tag, h, *tensor_to_frames(gp)], op.split(MAX_FRAME // 4))
                    for h, (gp, op) in zip(head, pieces, strict=True)
                ]
            )

        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        peer_of = {sock: i for i, sock in enumerate(self.socks)}

        def step() -> None:
            for i in range(k):  # the peers' i-th messages side by side
                for sock, messages in zip(self.socks, per_peer, strict=True):
                    if i < len(messages):
                        sock.send_multipart(messages[i][0], copy=False)
            answered = [0] * self.n
            left = sum(len(m) for m in per_peer)
            while left:  # each answer as it comes, from whichever peer
                ready = poller.poll(60_000)
                if not ready:
                    raise RuntimeError("a peer did not answer within 60 s")
                for sock, _ in ready:
                    peer = peer_of[sock]
                    reply = sock.recv_multipart(copy=False)
                    spans = per_peer[peer][answered[peer]][1]  # (a peer answers in order)
                    for frame, span in zip(reply, spans, strict=True):
                        span.copy_(torch.frombuffer(frame.buffer, dtype=torch.float32))
                    answered[peer] += 1
                    left -= 1

        return step

    def __exit__(self, *exc: object) -> None:
        stop_peers(self.procs, self.socks)
