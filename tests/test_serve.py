"""pslm serve: the HTTP API (in-process and as a real process on 127.0.0.1), and reading a live
cluster's parameters (``pslm.ps.client.reader``) while it trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from pslm.errors import ConfigError, PSLMError
from pslm.lm.checkpoint import load_model
from pslm.lm.classifier import GPTClassifier
from pslm.lm.generate import generate
from pslm.lm.model import GPT, GPTConfig
from pslm.lm.tokenizer import train_tokenizer
from pslm.ps.client.reader import ParameterReader
from pslm.ps.launch.local import LocalCluster
from pslm.serve.app import Admission, ApiError, Limits, chat_prompt, create_app
from pslm.serve.model import Follower, ServedModel, State
from tests.conftest import REPO, launch_config
from tests.test_train import CONFIG, _story, pslm, start_run

TEXTS = ["the king walked over the river", "国王走过河边的石头", "dark stone, soft light!"] * 20


def _served(task: str = "generate", *, seed: int = 0) -> ServedModel:
    tok = train_tokenizer("bpe", TEXTS, vocab_size=300)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(seed)
    labels = ["calm", "storm"]
    model = GPTClassifier(config, 2) if task == "classify" else GPT(config)
    meta: dict[str, Any] = {"model": asdict(config), "task": task, "labels": labels}
    served = ServedModel(Path("mem"), meta, tok, "checkpoint")
    served.current = State(model.eval(), 7, 7, time.time())
    return served


LOCAL = "http://127.0.0.1:8000"


@pytest.fixture()
def client() -> TestClient:
    app = create_app(_served(), Limits(max_tokens=50, max_body_bytes=4096))
    return TestClient(app, base_url=LOCAL)


def test_generate_matches_the_model_and_streams_the_same_text(client: TestClient) -> None:
    served = client.app.state.served  # type: ignore[attr-defined]
    prompt = "国王 walked"
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = generate(served.current.model, served.tokenizer.encode(prompt), max_new_tokens=12,
                   temperature=0)  # fmt: skip
    assert out["text"] == served.tokenizer.decode(ids)
    assert out["tokens"] == 12 and out["version"] == 7 and out["finish_reason"] == "length"
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    pieces = [e["text"] for e in events[:-1]]
    assert "\ufffd" not in "".join(pieces)  # no character given out in halves
    assert events[-1]["done"] and events[-1]["text"] == "".join(pieces) == out["text"]
    assert events[-1]["tokens"] == 12 and all(e["version"] == 7 for e in events)
    sampled = [client.post("/v1/generate", json={**body, "temperature": 1, "seed": 3}).json()
               for _ in range(2)]  # fmt: skip
    assert sampled[0]["text"] == sampled[1]["text"]  # the seed fixes the sample
    for tiny in (1e-40, 1e-300, 5e-324):  # the greedy limit, not an overflow
        r = client.post("/v1/generate", json={**body, "temperature": tiny, "seed": 3})
        assert r.status_code == 200 and r.json()["text"] == out["text"], (tiny, r.text)
        with client.stream(
            "POST", "/v1/generate", json={**body, "temperature": tiny, "stream": True}
        ) as s:
            last = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: ")][-1]
        assert last["done"] and last["text"] == out["text"], tiny


def test_only_loopback_or_allowed_hosts_and_origins_are_answered() -> None:
    """A page on another site, or one reaching 127.0.0.1 through a name it controls (DNS
    rebinding), is refused on every route, the dashboard's steering included."""
    app = create_app(_served(), Limits(allowed_hosts=("gpu-box",)))
    for base in (LOCAL, "http://localhost:8000", "http://[::1]:8000", "http://gpu-box:8000"):
        with TestClient(app, base_url=base) as ok:
            assert ok.get("/healthz").status_code == 200, base
            origin = {"origin": base}
            assert ok.post("/v1/generate", json={"prompt": "x"}, headers=origin).status_code == 200
    with TestClient(app, base_url="http://evil.example:8000") as rebound:
        for method, path in (("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/generate"),
                             ("POST", "/api/ctl"), ("GET", "/")):  # fmt: skip
            r = rebound.request(method, path, json={"prompt": "x"})
            assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden_host", path
    with TestClient(app, base_url=LOCAL) as local:
        for origin in ("http://evil.example", "null", "https://127.0.0.1.evil.example"):
            r = local.post("/v1/generate", json={"prompt": "x"}, headers={"origin": origin})
            assert r.status_code == 403, origin


def test_bad_requests_are_4xx_with_a_json_error(client: TestClient) -> None:
    cases = [
        ({"prompt": ""}, 422),
        ({"prompt": "x", "max_tokens": 51}, 422),  # over the server's limit
        ({"prompt": "x", "max_tokens": 0}, 422),
        ({"prompt": "x", "temperature": -1}, 422),
        ({"prompt": "x", "top_p": 0}, 422),
        ({"prompt": "x", "top_k": 0}, 422),
        ({"prompt": "x", "unknown": 1}, 422),
        ({"prompt": 5}, 422),
        ([1, 2], 422),
        ({"prompt": "x" * 5000}, 413),  # over the body limit
    ]
    for body, status in cases:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"], body
    r = client.post(
        "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "error" in r.json()
    assert client.post("/v1/classify", json={"text": "hi"}).status_code == 400  # a language model
    assert client.post("/v1/chat", json={"messages": []}).status_code == 422
    bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
    assert client.post("/v1/chat", json=bad_role).status_code == 422
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/healthz").json()["status"] == "ok"  # still up
    metrics = client.get("/metrics").text
    assert 'pslm_http_requests_total{path="/v1/generate",status="422"}' in metrics
    assert 'pslm_http_requests_total{path="other",status="404"} 1.0' in metrics
    assert "pslm_model_version 7.0" in metrics


def test_chat_builds_the_documented_prompt_and_stops_at_the_next_turn(client: TestClient) -> None:
    served = client.app.state.served  # type: ignore[attr-defined]
    messages = [("system", "Be brief."), ("user", "Hello  there"), ("assistant", "Hi."),
                ("user", "Who walked?")]  # fmt: skip
    assert chat_prompt(messages) == (
        "System: Be brief.\nUser: Hello there\nAssistant: Hi.\nUser: Who walked?\nAssistant:"
    )
    body = {"messages": [{"role": r, "content": c} for r, c in messages], "max_tokens": 30,
            "temperature": 0}  # fmt: skip
    r = client.post("/v1/chat", json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["message"]["role"] == "assistant" and reply["version"] == 7
    ids = generate(served.current.model, served.tokenizer.encode(chat_prompt(messages)),
                   max_new_tokens=30, temperature=0)  # fmt: skip
    full = served.tokenizer.decode(ids)
    assert reply["message"]["content"] == full.split("\nUser:")[0].strip()
    assert reply["finish_reason"] == ("stop" if "\nUser:" in full else "length")


def test_classify_gives_labels_and_probabilities() -> None:
    served = _served("classify")
    client = TestClient(create_app(served), base_url=LOCAL)
    r = client.post("/v1/classify", json={"text": "the dark king"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out["probabilities"]) == {"calm", "storm"}
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-5
    assert out["label"] == max(out["probabilities"], key=out["probabilities"].get)
    assert client.post("/v1/generate", json={"prompt": "x"}).status_code == 400
    assert client.get("/v1/model").json()["labels"] == ["calm", "storm"]


def test_an_error_while_generating_keeps_its_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation runs in a worker thread; what it raises reaches the error handlers as it is
    (a 400 here, not a 500 for an exception wrapped on the way), and the place is freed."""

    def refuse(*args: Any, **kwargs: Any) -> Iterator[int]:
        raise ConfigError("a character the tokenizer does not know")
        yield 0  # (a generator, as the real one: it raises at its first token)

    monkeypatch.setattr("pslm.serve.app.token_stream", refuse)
    client = TestClient(create_app(_served()), base_url=LOCAL)
    r = client.post("/v1/generate", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request", r.text
    r = client.post("/v1/chat", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "does not know" in r.json()["error"]["message"]
    assert "pslm_generations_inflight 0.0" in client.get("/metrics").text


def test_not_ready_until_parameters_arrive() -> None:
    served = _served()
    state, served.current = served.current, None
    client = TestClient(create_app(served), base_url=LOCAL)
    assert client.get("/healthz").status_code == 503
    assert client.post("/v1/generate", json={"prompt": "x"}).status_code == 503
    served.current = state
    assert client.post("/v1/generate", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_stop_waits_for_the_followers_round() -> None:
    """A follower thread still inside torch when the process exits aborts it ("terminate called
    without an active exception"): ``stop`` returns once the round in progress is over."""
    served = _served()
    assert served.current is not None
    tensors = {n: p.detach().clone() for n, p in served.current.model.named_parameters()}
    follower = Follower(served, "tcp://127.0.0.1:9", every=0.01)  # (no scheduler is asked)
    inside, release, finished = threading.Event(), threading.Event(), threading.Event()

    def refresh(reader: ParameterReader) -> bool:  # a round that outlasts the stop request
        inside.set()
        release.wait(30)
        served.take(tensors, 1, "cpu")
        finished.set()
        return True

    follower.refresh = refresh  # type: ignore[method-assign]
    follower.start()
    assert inside.wait(30)
    assert not follower.stop(timeout=0.05) and follower.is_alive()  # still in its round
    release.set()
    assert follower.stop(timeout=30)
    assert finished.is_set() and not follower.is_alive()
    assert served.current is not None and served.current.version == 1


# --- a real serving process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    (root / "story.txt").write_text(_story())
    (root / "tiny.toml").write_text(CONFIG)
    run = root / "run"
    res = pslm("train", "--config", root / "tiny.toml", "--data", root / "story.txt",
               "--run-dir", run)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return run


def _start_serve(tmp_path: Path, *args: str | Path) -> tuple[subprocess.Popen[str], str]:
    addr = tmp_path / "serve.addr"
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pslm",
                "serve",
                *map(str, args),
                "--port",
                "0",
                "--address-file",
                str(addr),
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    deadline = time.monotonic() + 60
    while not addr.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((tmp_path / "serve.log").read_text())
        time.sleep(0.05)
    return proc, addr.read_text()


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sixteen_concurrent_requests_streaming_and_not(trained: Path, tmp_path: Path) -> None:
    proc, url = _start_serve(tmp_path, "--run", trained)
    try:
        model, tok, meta = load_model(trained)
        prompts = [f"The {w}" for w in "king queen river stone light dark walked spoke".split()]
        expected = {
            p: tok.decode(generate(model, tok.encode(p), max_new_tokens=16, temperature=0))
            for p in prompts
        }

        def ask(i: int) -> tuple[str, str, int]:
            prompt = prompts[i % len(prompts)]
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": i % 2 == 1}
            with httpx.Client(base_url=url, timeout=60) as http:
                if not body["stream"]:
                    r = http.post("/v1/generate", json=body)
                    assert r.status_code == 200, r.text
                    return prompt, r.json()["text"], r.json()["version"]
                with http.stream("POST", "/v1/generate", json=body) as s:
                    assert s.status_code == 200
                    lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ")]
                return prompt, "".join(e["text"] for e in lines[:-1]), lines[-1]["version"]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
        assert len(answers) == 16
        for prompt, text, version in answers:
            assert text == expected[prompt], prompt
            assert version == meta["version"]
        with httpx.Client(base_url=url, timeout=30) as http:  # bad requests, bounded
            deadline = time.monotonic() + 20
            for i in range(40):
                if time.monotonic() > deadline:
                    break
                bad = [{"prompt": ""}, {"max_tokens": 3}, {"prompt": "x", "top_p": 2}][i % 3]
                assert http.post("/v1/generate", json=bad).status_code == 422
            assert http.get("/healthz").status_code == 200
            assert http.get("/v1/model").json()["step"] == meta["step"]
    finally:
        _stop(proc)


def test_admission_refuses_beyond_its_limit_and_a_dropped_stream_frees_its_place() -> None:
    admission = Admission(2)
    with admission.admit(), admission.admit() as second:
        with pytest.raises(ApiError, match="2 generations in flight") as refused:
            with admission.admit():
                pass
        assert refused.value.status == 503
        holder = (piece for piece in ())  # a stream's body: a generator
        second.hand_to(holder)
    assert admission.inflight == 1  # the handed ticket is held by its stream
    del holder  # the stream is finished or dropped
    assert admission.inflight == 0


def test_health_answers_while_generations_fill_the_server(trained: Path, tmp_path: Path) -> None:
    """64 streaming generations at once against 8 places: each is answered in full or
    refused with 503 at once, /healthz and /metrics keep answering, and every place is free
    again afterwards (a stream whose client left included)."""
    proc, url = _start_serve(tmp_path, "--run", trained, "--max-inflight", "8")
    body = {"prompt": "The king", "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True}

    def ask(i: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/generate", json=body) as s:
                if s.status_code != 200:
                    s.read()
                    assert s.status_code == 503 and s.json()["error"]["type"] == "busy"
                    assert s.headers["retry-after"] == "1"
                    return 503
                data = (json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: "))
                first = next(data)
                if i % 8 == 0:
                    return 499  # the client leaves after the first piece
                *_, last = [first, *data]
                assert last["done"] and last["tokens"] == 200
                return 200

    try:
        with ThreadPoolExecutor(64) as pool, httpx.Client(base_url=url, timeout=10) as http:
            answers = [pool.submit(ask, i) for i in range(64)]
            polls = 0
            while not all(a.done() for a in answers) and polls < 2000:
                assert http.get("/healthz").status_code == 200
                assert "pslm_generations_inflight" in http.get("/metrics").text
                polls += 1
            codes = [a.result() for a in answers]
            assert polls > 0 and set(codes) <= {200, 499, 503}
            deadline = time.monotonic() + 30  # the server notices the clients that left
            while "pslm_generations_inflight 0.0" not in http.get("/metrics").text:
                assert time.monotonic() < deadline, "places were not given back"
                time.sleep(0.05)
            again = http.post("/v1/generate", json={**body, "stream": False}, timeout=60)
            assert again.status_code == 200 and again.json()["tokens"] == 200
    finally:
        _stop(proc)


def test_serve_follows_a_training_cluster(trained: Path, tmp_path: Path) -> None:
    shutil.copy(trained.parent / "story.txt", tmp_path / "story.txt")
    train, run = start_run(tmp_path, 3000, interval=1000, name="live")
    proc = None
    try:
        deadline = time.monotonic() + 60
        while not (run / "scheduler.addr").exists() or not (run / "metrics.jsonl").exists():
            assert train.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc, url = _start_serve(tmp_path, "--run", run, "--follow", "--refresh", "0.2")
        seen: dict[int, str] = {}
        # sampled with a fixed seed: any change of the parameters shows in the text (greedy
        # text can settle early on a tiny model: "stone stone stone")
        body = {"prompt": "The king", "max_tokens": 24, "temperature": 1.0, "seed": 7}

        def enough() -> bool:
            return len(seen) >= 3 and len(set(seen.values())) >= 2

        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 60
            while not enough() and time.monotonic() < deadline and train.poll() is None:
                r = http.post("/v1/generate", json=body)
                if r.status_code == 503:  # not read yet
                    continue
                assert r.status_code == 200, r.text
                seen.setdefault(r.json()["version"], r.json()["text"])
            info = http.get("/v1/model").json()
        assert info["source"] == "cluster"
        assert len(seen) >= 3, f"the served version did not advance: {sorted(seen)}"
        assert len(set(seen.values())) >= 2, "generation did not change as training went on"
    finally:
        if proc is not None:
            _stop(proc)
        train.send_signal(signal.SIGINT)
        train.communicate(timeout=30)


@pytest.mark.parametrize(
    ("consistency", "lag"),
    [("bsp", 0.0), ("bsp", 0.01), ("ssp:2", 0.0)],
    ids=["bsp", "bsp-lagging", "ssp"],
)
def test_reader_snapshots_are_whole(tmp_path: Path, consistency: str, lag: float) -> None:
    """Every parameter is minus its version, so a snapshot shows exactly which version each
    shard's part came from: under BSP all one version, under SSP each shard whole. A reader
    that lags (as on a loaded machine: here it takes ``lag`` seconds to look at each batch of
    replies, while the cluster makes several steps) still gets one version under BSP."""
    cfg = launch_config(
        tmp_path,
        num_servers=3,
        num_workers=2,
        worker="tests.workers:steady",
        worker_args={"steps": 4000, "numel": 3000, "consistency": consistency},
    )
    with LocalCluster(cfg) as cluster, ParameterReader(cluster.scheduler_address) as reader:
        wait, rounds = reader.channel.wait, []

        def lagging_wait(*args: Any, **kwargs: Any) -> Any:
            replies = wait(*args, **kwargs)
            rounds.append(len(replies))
            time.sleep(lag)
            return replies

        reader.channel.wait = lagging_wait  # type: ignore[method-assign]
        versions = []
        deadline = time.monotonic() + 60
        while len(versions) < 15 and time.monotonic() < deadline and not cluster.poll():
            try:
                snap = reader.read()
            except PSLMError:
                if cluster.poll():  # it finished meanwhile
                    break
                if not versions:  # not up yet: no model declared, no servers in the table
                    time.sleep(0.05)
                    continue
                raise
            assert snap.synchronous == (consistency == "bsp")
            ks = reader.keyspace
            assert ks is not None
            for s in range(len(snap.versions)):
                for chunk in ks.shard(s):
                    t = snap.tensors[ks.tensors[chunk.tensor].name].view(-1)
                    part = t[chunk.offset : chunk.offset + chunk.length]
                    assert torch.equal(part, torch.full_like(part, -snap.versions[s]))
            if consistency == "bsp":
                assert snap.consistent, snap.versions
            versions.append(snap.version)
        print(f"{len(versions)} snapshots in {sum(r == 3 for r in rounds)} rounds of reads")
    assert len(versions) >= 3 and versions == sorted(versions)
    assert versions[-1] > versions[0]
