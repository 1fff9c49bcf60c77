"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright): it loads,
lists every node of a live cluster, its loss chart gains points, and Pause pauses the job.
The screenshot goes to test-artifacts/dashboard.png."""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_serve import _start_serve, _stop
from tests.test_train import start_run

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"


def test_dashboard_shows_the_cluster_and_pauses_it(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium: `make test` installs it (Debian package chromium) as root")
    train, run = start_run(tmp_path, 5000, interval=9000)
    serve = None
    try:
        deadline = time.monotonic() + 60
        while not (run / "scheduler.addr").exists():
            assert train.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        serve, url = _start_serve(tmp_path, "--run", run, "--follow")
        for header in ({}, {"x-pslm-operator": "0" * 64}):  # steering needs the credential
            request = urllib.request.Request(
                url + "/api/ctl",
                data=b'{"action": "pause"}',
                headers={"content-type": "application/json", **header},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 403
            assert "operator credential" in json.loads(refused.value.read())["error"]["message"]
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
            )  # fmt: skip
            try:
                page = browser.new_page(viewport={"width": 1150, "height": 900})
                # steering asks for the run's operator credential: the user pastes it
                credential = (run / "operator").read_text().strip()
                page.on("dialog", lambda dialog: dialog.accept(credential))
                page.goto(url + "/dashboard")
                nodes = [f"server-{i}" for i in range(4)] + ["worker-0", "worker-1"]
                for node in nodes:  # 2 servers, their 2 backups, 2 workers
                    page.wait_for_selector(f"#nodes tr[data-node='{node}']", timeout=30_000)
                points = "Number(document.querySelector('#loss-chart').dataset.points || 0)"
                page.wait_for_function(f"{points} > 0", timeout=30_000)
                first = page.evaluate(points)
                page.wait_for_function(f"{points} > {first}", timeout=30_000)  # it gains points
                page.click("#pause")
                page.wait_for_function(
                    "document.querySelector('#state').textContent === 'paused'", timeout=30_000
                )
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
            finally:
                browser.close()
        deadline = time.monotonic() + 30  # the job itself paused: its metrics say from when
        paused = None
        while paused is None and time.monotonic() < deadline:
            for line in (run / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line) if line.endswith("}") else {}
                if record.get("steering", {}).get("paused"):
                    paused = record["steering"]["from_step"]
            time.sleep(0.05)
        assert paused is not None, "the job did not pause"
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == paused - 1  # nothing trained past the pause
    finally:
        if serve is not None:
            _stop(serve)
        train.send_signal(signal.SIGINT)
        train.communicate(timeout=60)
