"""The dashboard: a page that shows what the cluster is doing, and its API.

    add_dashboard(app, run_dir, scheduler)      # GET /dashboard and /api/* on a FastAPI app

    GET  /dashboard            the page (plain HTML, CSS and JavaScript: no CDN, works offline)
    GET  /api/cluster          the scheduler's status: nodes (role, state, last heartbeat, a
                               server's bytes in/out and version), live settings, run directory
    GET  /api/metrics?after=N  the run's metrics.jsonl records with step > N (at most 5000)
    POST /api/ctl              {action: set|pause|resume|checkpoint, values: {lr, clip,
                               weight_decay}} -> the new live settings; {action:
                               remove-worker, node}; {action: add-worker} (as ``pslm ctl``)

Steering through /api/ctl needs the run's operator credential (``RUN/operator``, readable by
the user who started the job) in the ``X-PSLM-Operator`` header, as ``pslm ctl`` needs it: the
page asks for it once and keeps it for the browser tab. The server checks it and passes it on
to the scheduler, which checks it too.
"""

from __future__ import annotations

import json
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Header, Query
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from pslm.errors import ConfigError, PSLMError, RefusedError
from pslm.ps.client.reader import SchedulerLink
from pslm.ps.core import operator
from pslm.ps.core.steering import Steering

MAX_RECORDS = 5000


class CtlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["set", "pause", "resume", "checkpoint", "remove-worker", "add-worker"]
    values: dict[str, float | str] = Field(default_factory=dict, max_length=8)
    node: str = Field("", max_length=64)
    """remove-worker: which one (e.g. worker-1)."""


class MetricsTail:
    """The records of a metrics.jsonl, read incrementally (a resume truncates the file: then
    it is read again from the start)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._lock = threading.Lock()

    def after(self, step: int) -> list[dict[str, Any]]:
        with self._lock:
            self._read()
            out = [r for r in self.records if r.get("step", -1) > step]
        return out[:MAX_RECORDS]

    def _read(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size < self._offset:
            self.records, self._offset = [], 0
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read(size - self._offset)
        end = chunk.rfind(b"\n") + 1  # whole lines only: the writer may be mid-line
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)
        self._offset += end


def add_dashboard(app: FastAPI, run_dir: Path, scheduler: str | None) -> None:
    link = SchedulerLink(scheduler) if scheduler else None
    tail = MetricsTail(run_dir / "metrics.jsonl")
    page = resources.files("pslm.serve").joinpath("static/dashboard.html").read_text()

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/cluster")
    def cluster() -> JSONResponse:
        if link is None:
            return JSONResponse({"live": False, "run_dir": str(run_dir), "nodes": []})
        try:
            status = link.request("status")
        except PSLMError as exc:
            return JSONResponse(
                {"live": False, "run_dir": str(run_dir), "nodes": [], "error": str(exc)}
            )
        return JSONResponse({"live": True, **status})

    @app.get("/api/metrics")
    def metrics(after: int = Query(-1, ge=-1)) -> dict[str, Any]:
        return {"records": tail.after(after)}

    @app.post("/api/ctl")
    def ctl(req: CtlRequest, x_pslm_operator: str = Header("", max_length=256)) -> JSONResponse:
        try:
            operator.check(x_pslm_operator, operator.read(run_dir))
        except (ConfigError, RefusedError) as exc:
            return JSONResponse(
                {"error": {"type": "forbidden", "message": str(exc)}}, status_code=403
            )
        if link is None:
            return JSONResponse(
                {"error": {"type": "not_live", "message": "not attached to a live cluster"}},
                status_code=409,
            )
        try:  # checked here: a bad one is a 400
            if req.action not in ("remove-worker", "add-worker"):
                Steering().change(req.action, req.values)
            elif req.values or (req.action == "remove-worker") != bool(req.node):
                raise ConfigError(f"{req.action} takes {'a node' if req.node else 'nothing'}")
        except ConfigError as exc:
            return JSONResponse(
                {"error": {"type": "invalid_request", "message": str(exc)}}, status_code=400
            )
        try:
            body = {"action": req.action, "values": req.values, "node": req.node}
            reply = link.request("ctl", {**body, operator.FIELD: x_pslm_operator})
        except PSLMError as exc:
            return JSONResponse(
                {"error": {"type": "cluster", "message": str(exc)}}, status_code=502
            )
        return JSONResponse(reply)
