"""Serving operations: requests that arrive together decode in one batch and still write what each writes alone;
a client that disconnects frees its row; the request timeout; graceful shutdown (finish within the grace period,
else cancel, and say so); /health and completions answer 503 while the model loads; the batch and timing
histograms in /metrics. Over a random tiny model; where a reply must be long, the per-request logits hook bans the
stop ids (a random model may end a reply at any token).

Run: .venv/bin/python -m pytest tests/serve/test_operations.py -q
"""

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from longcat_lab.data import DataConfig, load_tokenizer  # noqa: E402
from longcat_lab.inference.generate import stream  # noqa: E402
from longcat_lab.inference.text import TextStream  # noqa: E402
from longcat_lab.serve.app import BackgroundServer, create_app, drain  # noqa: E402
from longcat_lab.serve.engine import Engine, QueueFull  # noqa: E402
from longcat_lab.serve.metrics import Metrics  # noqa: E402
from longcat_lab.serve.scheduler import SHUTDOWN  # noqa: E402
from longcat_lab.testing import random_model  # noqa: E402

NAME = "ops-test"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(512, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))


def hook(
    engine: Engine, monkeypatch, gate: threading.Event | None = None, ban_stops: bool = False, pace: float = 0.0
) -> None:
    """Give every request to `engine` a logits mask that waits for `gate` before its first token and, with
    `ban_stops`, never lets it draw a stop id (so it runs to max_tokens); `pace` seconds of sleep per token keep a
    long reply long in wall time too, however fast the machine."""
    parse = Engine.parse.__get__(engine)
    banned = sorted(engine.stop_ids)

    def mask(done, logits):
        if gate is not None and not done:
            gate.wait(30)
        time.sleep(pace)
        if ban_stops:
            logits = logits.clone()
            logits[:, banned] = float("-inf")
        return logits

    monkeypatch.setattr(engine, "parse", lambda body: dataclasses.replace(parse(body), logits_mask=mask))


def body(content: str, max_tokens: int, **kw) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **kw}


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g} s")
        time.sleep(0.01)


def client(srv: BackgroundServer):
    return openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)


def test_requests_arriving_together_decode_in_one_batch_and_write_what_each_writes_alone(tokenizer, monkeypatch):
    engine = Engine(random_model(seed=11, bias_std=0.05), tokenizer, NAME, max_batch=8)
    gate = threading.Event()
    hook(engine, monkeypatch, gate)  # the first request holds the worker until all eight are queued
    prompts = [f"Request {i}: " + "the cat sat on the mat " * (i % 4) for i in range(8)]

    def alone(p):
        ids = engine.parse(body(p, 1)).prompt_ids
        text = TextStream(tokenizer, stream(engine.model, torch.tensor([ids]), 4 + p.count("cat")), engine.stop_ids)
        return text.follow()

    want = {p: alone(p) for p in prompts}
    srv = BackgroundServer(create_app(engine))
    try:
        c = client(srv)

        def ask(p):
            r = c.chat.completions.create(**body(p, 4 + p.count("cat"), temperature=0))
            return p, r.choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, p) for p in prompts]
            wait_for(lambda: engine.metrics.queue_depth == 8, "eight queued requests")
            gate.set()
            got = dict(f.result(120) for f in futures)
        assert got == want
        m = samples(httpx.get(f"{srv.root}/metrics").text)
        # seven joined in one step after the first: some step decoded more than four sequences at once
        assert m['longcat_step_batch_size_bucket{le="4"}'] < m["longcat_step_batch_size_count"]
        assert m["longcat_batch_size"] == 0 and m["longcat_kv_cache_bytes"] == 0
    finally:
        gate.set()
        srv.stop()


def test_a_disconnected_stream_frees_its_row_at_once(tokenizer, monkeypatch):
    engine = Engine(random_model(seed=12), tokenizer, NAME, max_batch=1)
    hook(engine, monkeypatch, ban_stops=True, pace=0.005)  # 400 tokens: at least 2 s
    srv = BackgroundServer(create_app(engine))
    try:
        with httpx.stream("POST", f"{srv.url}/chat/completions", json=body("go on", 400, stream=True)) as r:
            contents = 0
            for line in r.iter_lines():
                contents += '"content"' in line
                if contents >= 3:
                    break  # the client goes away mid-stream
        # one row only: this request can run only once the first one's row is free
        reply = client(srv).chat.completions.create(**body("next", 4, temperature=0))
        assert reply.usage.completion_tokens == 4
        wait_for(lambda: engine.metrics.queue_depth == 0, "an empty queue")
        assert engine.metrics.batch_size == 0
        assert engine.metrics.completion_tokens < 400  # the first stopped long before its 400 tokens
    finally:
        srv.stop()


def test_a_request_past_the_timeout_gets_a_504(tokenizer, monkeypatch):
    engine = Engine(random_model(seed=13), tokenizer, NAME, request_timeout=0.2)
    parse = Engine.parse.__get__(engine)
    banned = sorted(engine.stop_ids)

    def slow(done, logits):  # the first token alone takes longer than the timeout
        if not done:
            time.sleep(0.3)
        logits = logits.clone()
        logits[:, banned] = float("-inf")
        return logits

    monkeypatch.setattr(engine, "parse", lambda b: dataclasses.replace(parse(b), logits_mask=slow))
    srv = BackgroundServer(create_app(engine))
    try:
        with pytest.raises(openai.APIStatusError) as info:
            client(srv).chat.completions.create(**body("hi", 400))
        assert info.value.status_code == 504 and "request timeout of 0.2 s" in info.value.body["message"]
        assert samples(engine.metrics.render())["longcat_request_timeouts_total"] == 1
        wait_for(lambda: engine.metrics.queue_depth == 0, "an empty queue")
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="request_timeout=0"):
        Engine(engine.model, tokenizer, NAME, request_timeout=0)


def run_shutdown(engine: Engine, grace: float, gate: threading.Event) -> tuple[int, int]:
    """Shut `engine` down in a thread, and open `gate` once it refuses new requests."""
    out = []
    t = threading.Thread(target=lambda: out.append(engine.shutdown(grace)))
    t.start()

    def refused():
        try:
            engine.submit(engine.parse(body("late", 2)), lambda e: None)
        except QueueFull as err:
            return "shutting down" in str(err)
        return False

    wait_for(refused, "refusing new requests")
    gate.set()
    t.join(60)
    return out[0]


@pytest.mark.parametrize("grace, finished", [(60.0, True), (0.0, False)])
def test_shutdown_finishes_within_the_grace_period_else_cancels(tokenizer, monkeypatch, grace, finished):
    engine = Engine(random_model(seed=14), tokenizer, NAME, max_batch=1)
    gate = threading.Event()
    hook(engine, monkeypatch, gate, ban_stops=True)
    events = {k: [] for k in "ab"}
    for k in "ab":  # a runs (held at its first token by the gate), b waits for its row
        engine.submit(engine.parse(body(f"request {k}", 6)), events[k].append)
    assert run_shutdown(engine, grace, gate) == ((2, 0) if finished else (0, 2))
    for k in "ab":
        kind, value = events[k][-1]
        if finished:
            assert kind == "done" and value.completion_tokens == 6
        else:
            assert (kind, value) == ("error", SHUTDOWN)


def test_the_server_says_how_its_shutdown_went(tokenizer, capsys):
    engine = Engine(random_model(seed=15), tokenizer, NAME)
    app = create_app(engine, shutdown_grace=5)
    srv = BackgroundServer(app)
    client(srv).chat.completions.create(**body("hi", 2))
    srv.stop()
    assert "[longcat-lab] shut down: 0 requests finished, 0 cancelled" in capsys.readouterr().out
    assert drain(app) is None  # once only


def test_health_is_not_ready_while_the_model_loads(tokenizer):
    gate, metrics = threading.Event(), Metrics()

    def load():
        gate.wait(30)
        return Engine(random_model(seed=16), tokenizer, NAME, metrics)

    srv = BackgroundServer(create_app(load=load, metrics=metrics))
    try:
        r = httpx.get(f"{srv.root}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as info:
            client(srv).chat.completions.create(**body("hi", 2))
        assert info.value.status_code == 503 and "loading" in info.value.body["message"]
        assert httpx.get(f"{srv.root}/metrics").status_code == 200
        gate.set()
        wait_for(lambda: httpx.get(f"{srv.root}/health").status_code == 200, "a ready server")
        assert client(srv).chat.completions.create(**body("hi", 2)).usage.completion_tokens >= 1
    finally:
        gate.set()
        srv.stop()

    def broken():
        raise ValueError("no such checkpoint")

    srv = BackgroundServer(create_app(load=broken))
    try:
        wait_for(lambda: httpx.get(f"{srv.root}/health").json()["status"] == "failed", "a failed load")
        assert "no such checkpoint" in httpx.get(f"{srv.root}/health").json()["error"]
    finally:
        srv.stop()


def test_metrics_have_the_batch_and_timing_histograms(tokenizer):
    engine = Engine(random_model(seed=17), tokenizer, NAME)
    srv = BackgroundServer(create_app(engine))
    try:
        used = [client(srv).chat.completions.create(**body(f"q{i}", 3)).usage.completion_tokens for i in range(3)]
        text = httpx.get(f"{srv.root}/metrics").text
    finally:
        srv.stop()
    m = samples(text)
    for name in ("queue_wait_seconds", "time_to_first_token_seconds", "request_latency_seconds"):
        assert f"# TYPE longcat_{name} histogram" in text
        assert m[f"longcat_{name}_count"] == 3 == m[f'longcat_{name}_bucket{{le="+Inf"}}']
        buckets = [v for k, v in m.items() if k.startswith(f"longcat_{name}_bucket")]
        assert buckets == sorted(buckets)  # cumulative
    # time per output token: one figure per request that drew more than one token
    assert m["longcat_time_per_output_token_seconds_count"] == sum(n > 1 for n in used)
    assert m["longcat_step_batch_size_count"] >= 1 and m["longcat_batch_size"] == 0


def test_the_cli_refuses_bad_batching_arguments(capsys, tmp_path):
    from longcat_lab.cli import main

    assert main(["serve", "--ckpt", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch=0" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(tmp_path), "--max-batch", "4", "--speculative"]) == 2
    assert "--speculative" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(tmp_path), "--request-timeout", "0"]) == 2
    assert "--request-timeout" in capsys.readouterr().err
