"""Serving a run over HTTP, from a checkpoint or following a live cluster (``pslm serve``).

    serve(ServeConfig(run_dir="runs/bbc-news"))                     # the newest checkpoint
    serve(ServeConfig(run_dir="runs/bbc-news", scheduler="tcp://127.0.0.1:9000", refresh=1))

The API is in ``pslm.serve.app``; what is served, and how it follows the cluster, in
``pslm.serve.model``.
"""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pslm.errors import ConfigError

log = logging.getLogger("pslm.serve")


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    run_dir: str = ""
    """The run whose model is served (its tokenizer and model shape; its newest checkpoint
    unless ``scheduler`` is given)."""
    scheduler: str = ""
    """A live cluster to follow: parameters are read from its servers."""
    checkpoint: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    refresh: float = 1.0
    """Seconds between checks for a newer version (following a cluster)."""
    device: str = "cpu"
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    address_file: str = ""
    """Write ``http://host:port`` here once listening (useful with port 0)."""
    max_tokens: int = 1024
    max_prompt_chars: int = 8192
    parallel: int = 1
    """Requests computing their next token at the same time (``pslm.serve.app.Limits``)."""
    kv_cache: bool = True
    """Generate with the KV cache (off: recompute the whole context per token; benchmarks)."""
    max_inflight: int = 32
    """Generations admitted at once; more get 503 (``pslm.serve.app.Limits``)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names requests may use besides loopback (``pslm.serve.app.Limits``)."""
    head_timeout: float = 10.0
    """Seconds a request head may take; then the connection is closed (``pslm.serve.intake``)."""
    body_timeout: float = 30.0
    """Seconds a request body may take; then 408 and the connection is closed."""
    max_body_bytes: int = 1024 * 1024
    """Larger request bodies are refused with 413."""

    def __post_init__(self) -> None:
        if not self.run_dir and not self.scheduler:
            raise ConfigError("give --run DIR (a checkpoint) or --scheduler ADDR (a live cluster)")
        if self.refresh <= 0:
            raise ConfigError(f"--refresh must be positive, got {self.refresh:g}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must lie in [0, 65535], got {self.port}")
        if min(self.max_tokens, self.max_prompt_chars, self.parallel, self.max_inflight) < 1:
            raise ConfigError("the request limits must be positive")
        if min(self.head_timeout, self.body_timeout, self.max_body_bytes) <= 0:
            raise ConfigError("the request timeouts and body limit must be positive")


def serve(cfg: ServeConfig) -> int:
    """Load (or attach), listen, and answer until interrupted. Returns the exit code."""
    import torch

    from pslm.serve.app import Limits, create_app
    from pslm.serve.intake import http_server
    from pslm.serve.model import Follower, ServedModel

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    follower = None
    if cfg.scheduler:
        run_dir = cfg.run_dir or _run_dir_of(cfg.scheduler)
        served = ServedModel.from_run(run_dir)
        follower = Follower(served, cfg.scheduler, every=cfg.refresh, device=cfg.device)
        follower.start()
        follower.first.wait(timeout=30.0)
    else:
        served = ServedModel.from_checkpoint(cfg.run_dir, cfg.checkpoint or None, cfg.device)
    limits = Limits(
        max_prompt_chars=cfg.max_prompt_chars,
        max_tokens=cfg.max_tokens,
        kv_cache=cfg.kv_cache,
        parallel=cfg.parallel,
        allowed_hosts=cfg.allowed_hosts,
        max_inflight=cfg.max_inflight,
        max_body_bytes=cfg.max_body_bytes,
        body_timeout=cfg.body_timeout,
    )
    app = create_app(served, limits, cfg.scheduler or None)
    sock = _listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    if cfg.address_file:
        tmp = Path(cfg.address_file + ".tmp")
        tmp.write_text(url)
        tmp.replace(cfg.address_file)
    current = served.current
    print(
        f"pslm serve: {served.run_dir} ({served.task}, {served.source}, version "
        f"{current.version if current else 'none yet'}) on {url}",
        file=sys.stderr,
        flush=True,
    )
    server = http_server(app, head_timeout=cfg.head_timeout)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn finished the requests and stopped
        pass
    finally:
        if follower is not None and not follower.stop():
            log.warning("the follower is still reading from the cluster; exiting anyway")
        sock.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _run_dir_of(scheduler: str) -> str:
    """The run directory the cluster's scheduler writes (for its tokenizer and model)."""
    from pslm.ps.client.reader import ParameterReader

    with ParameterReader(scheduler, timeout=10.0) as reader:
        run_dir = str(reader.status().get("run_dir") or "")
    if not run_dir or not Path(run_dir).is_dir():
        raise ConfigError(
            f"the scheduler at {scheduler} names no run directory here: give --run DIR"
        )
    return run_dir
