"""`longcat-lab serve` through the official `openai` client: plain, streamed, seeded and tool-calling completions,
refused requests, concurrent clients, the queue limit and the Prometheus metrics. The server runs under uvicorn in
a thread on a free localhost port, over a random tiny model; where a reply must contain a tool call, the model's
logits are masked to a script of token ids through the scheduler's per-request hook (a random model writes no
tool calls).

Run: .venv/bin/python -m pytest tests/serve -q
"""

import dataclasses
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from longcat_lab.chat import render  # noqa: E402
from longcat_lab.chat.template import END_OF_TURN, tool_call_block  # noqa: E402
from longcat_lab.data import DataConfig, load_tokenizer  # noqa: E402
from longcat_lab.inference import generate  # noqa: E402
from longcat_lab.model import presets  # noqa: E402
from longcat_lab.serve.app import BackgroundServer, create_app  # noqa: E402
from longcat_lab.serve.engine import Engine  # noqa: E402
from longcat_lab.testing import random_model  # noqa: E402

NAME = "tiny-test"
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


class Server(BackgroundServer):
    """The application over `engine` in a background thread, with the official client pointed at it."""

    def __init__(self, engine: Engine):
        super().__init__(create_app(engine))
        self.engine = engine

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(512, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))


@pytest.fixture(scope="module")
def server(tokenizer):
    torch.set_num_threads(1)
    # A longer context than the tiny preset's 512: the tool description alone is about 480 of its tokens.
    config = dataclasses.replace(presets.tiny(), max_position_embeddings=2048)
    srv = Server(Engine(random_model(config, seed=7, bias_std=0.05), tokenizer, NAME, max_queue=64))
    yield srv
    srv.stop()


def greedy_text(engine: Engine, messages, max_tokens: int) -> str:
    """What greedy decoding of the rendered prompt writes, up to the first end-of-turn or end-of-text id."""
    ids = engine.tokenizer.encode(render(messages)).ids
    out = generate(engine.model, torch.tensor([ids]), max_tokens)[0, len(ids) :].tolist()
    for i, t in enumerate(out):
        if t in engine.stop_ids:
            out = out[:i]
            break
    return engine.tokenizer.decode(out, skip_special_tokens=False)


def script_mask(engine: Engine, text: str, gate: threading.Event | None = None):
    """A logits mask (the scheduler's per-request hook) that forces the ids of `text` one by one, then the end of
    turn; with `gate`, the first token waits for it."""
    ids = engine.tokenizer.encode(text).ids + [min(engine.stop_ids)]

    def mask(done, logits):
        if gate is not None and not done:
            gate.wait(30)
        out = torch.full_like(logits, float("-inf"))
        out[:, ids[min(len(done), len(ids) - 1)]] = 0.0
        return out

    return mask


def scripted(monkeypatch, engine: Engine, text: str, gate: threading.Event | None = None) -> None:
    """Make every request to `engine` write `text` (a random model writes no tool calls): its parsed request
    carries `script_mask`."""
    parse = Engine.parse.__get__(engine)
    mask = script_mask(engine, text, gate)
    monkeypatch.setattr(engine, "parse", lambda body: dataclasses.replace(parse(body), logits_mask=mask))


def test_models_health_and_a_greedy_completion(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server.root}/health").json()["status"] == "ok"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be or not"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert choice.message.content == greedy_text(server.engine, messages, 8)
    prompt_len = len(server.engine.tokenizer.encode(render(messages)).ids)
    assert r.usage.prompt_tokens == prompt_len and 1 <= r.usage.completion_tokens <= 8


def test_a_streamed_completion_matches_the_plain_one(server):
    client = server.client()
    messages = [{"role": "user", "content": "def add(a, b):"}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # token by token, not at once
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_sampling_is_reproducible_with_a_seed_and_stops_at_a_stop_string(server):
    client = server.client()
    messages = [{"role": "user", "content": "Once upon a time"}]
    kw = dict(model=NAME, messages=messages, max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=3, **kw).choices[0].message.content
    assert client.chat.completions.create(seed=3, **kw).choices[0].message.content == a
    full = greedy_text(server.engine, messages, 12)
    stop = full[3:5]  # a string the greedy reply contains, a little way in
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_tool_calls_come_back_through_the_template_and_parser(server, monkeypatch):
    reply = "Let me compute." + tool_call_block("calculate", {"expression": "2+3"}) + END_OF_TURN
    scripted(monkeypatch, server.engine, reply)
    client = server.client()
    messages = [{"role": "user", "content": "What is 2+3?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=[CALCULATOR], max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute."
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculate" and json.loads(call.function.arguments) == {"expression": "2+3"}
    # Streamed: the text before the call streams, the call arrives whole in one delta.
    chunks = list(
        client.chat.completions.create(model=NAME, messages=messages, tools=[CALCULATOR], max_tokens=64, stream=True)
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        ("calculate", {"expression": "2+3"})
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me compute."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The client runs the tool and sends the result back; the call's arguments come back as a JSON string.
    scripted(monkeypatch, server.engine, "It is 5." + END_OF_TURN)
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    r = client.chat.completions.create(model=NAME, messages=follow, tools=[CALCULATOR], max_tokens=16)
    assert r.choices[0].message.content == "It is 5." and r.choices[0].finish_reason == "stop"
    # Without tools in the request nothing is parsed: the reply is text.
    scripted(monkeypatch, server.engine, reply)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=64)
    assert not r.choices[0].message.tool_calls and "<longcat_tool_call>" in r.choices[0].message.content


def test_a_stop_string_never_leaks_into_the_stream(server, monkeypatch):
    scripted(monkeypatch, server.engine, "first part STOP second part")
    client = server.client()
    kw = dict(model=NAME, messages=[{"role": "user", "content": "go"}], max_tokens=32, stop=["STOP", "zzz"])
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)]
    assert "".join(chunks) == "first part " and not any("S" in c for c in chunks)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == "first part " and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "assistant message"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"n": 2}, "n=2"),
        ({"tool_choice": "always", "tools": [CALCULATOR]}, "tool_choice"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(server, change, field):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(**body)
    assert info.value.status_code == 400 and field in info.value.body["message"]


def test_an_unknown_model_is_a_404_and_bad_json_a_400(server):
    with pytest.raises(openai.NotFoundError, match="tiny-test"):
        server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(f"{server.url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_twenty_concurrent_clients_get_their_own_answers(server):
    prompts = [f"Line {i}: the" for i in range(20)]
    want = {p: greedy_text(server.engine, [{"role": "user", "content": p}], 4) for p in prompts}
    client = server.client()

    def ask(p):
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": p}], max_tokens=4, temperature=0
        )
        return p, r.choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        got = dict(pool.map(ask, prompts))
    assert got == want


def test_a_full_queue_answers_503(tokenizer, monkeypatch):
    engine = Engine(random_model(seed=8), tokenizer, NAME, max_queue=1)
    gate = threading.Event()
    scripted(monkeypatch, engine, "hello" + END_OF_TURN, gate)
    srv = Server(engine)
    try:
        client = srv.client()
        body = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.chat.completions.create, **body)
            while engine.metrics.queue_depth < 1:
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(**body)
            assert info.value.status_code == 503 and "busy" in info.value.body["message"]
            gate.set()
            assert first.result(60).choices[0].message.content == "hello"
    finally:
        gate.set()
        srv.stop()


def test_metrics_are_prometheus_text(server):
    client = server.client()
    for content in ("x", "y"):  # two latencies, whichever tests ran before
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=3)
    text = httpx.get(f"{server.root}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['longcat_requests_total{path="/v1/chat/completions",status="200"}'] >= 1
    assert samples['longcat_request_errors_total{path="/v1/chat/completions",status="400"}'] >= 1
    count = samples["longcat_request_latency_seconds_count"]
    assert count >= 2 and samples['longcat_request_latency_seconds_bucket{le="+Inf"}'] == count
    buckets = [v for k, v in samples.items() if k.startswith("longcat_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert samples["longcat_completion_tokens_total"] >= 3 and samples["longcat_tokens_per_second"] > 0
    assert samples["longcat_kv_cache_peak_bytes"] > 0 and samples["longcat_kv_cache_bytes"] == 0
    assert "# TYPE longcat_request_latency_seconds histogram" in text


def test_the_cli_refuses_bad_arguments_in_one_line(capsys, tmp_path):
    from longcat_lab.cli import main

    assert main(["serve", "--ckpt", str(tmp_path), "--port", "70000"]) == 2
    assert "--port=70000" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_speculative_serving_writes_what_plain_greedy_writes(tokenizer):
    config = dataclasses.replace(presets.tiny(num_nextn_predict_layers=1), max_position_embeddings=2048)
    model = random_model(config, seed=9, bias_std=0.05)
    with pytest.raises(ValueError, match="speculative=True is not allowed"):
        Engine(random_model(seed=9), tokenizer, NAME, speculative=True)
    srv = Server(Engine(model, tokenizer, NAME, speculative=True))
    try:
        messages = [{"role": "user", "content": "Say something."}]
        reply = srv.client().chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == greedy_text(srv.engine, messages, 12)
    finally:
        srv.stop()
