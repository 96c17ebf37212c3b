"""Structured outputs in `longcat-lab serve` (`serve.request`, `inference.structured`, docs/design.md §7.2): over a
random tiny model, whose text is arbitrary, `response_format` json_object replies parse and json_schema replies
validate; `tool_choice` "required" and a named function give a call with valid arguments, and "auto" a valid call
once the model opens one; a schema the library
cannot compile and an unknown tool name are 400s naming the field; two requests with different constraints decoding
in one batch each keep their own. Schemas are bounded (maxLength, maxItems, closed objects) so every reply closes
within its token budget.

Run: .venv/bin/python -m pytest tests/serve/test_structured_outputs.py -q
"""

import dataclasses
import json

import httpx
import jsonschema
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from longcat_lab.chat import END_OF_TURN, TOOL_CALL_OPEN  # noqa: E402
from longcat_lab.data.tokenizer import train_tokenizer  # noqa: E402
from longcat_lab.inference.batch import BatchDecoder, Sequence  # noqa: E402
from longcat_lab.model import presets  # noqa: E402
from longcat_lab.serve.app import BackgroundServer, create_app  # noqa: E402
from longcat_lab.serve.engine import Engine  # noqa: E402
from longcat_lab.serve.request import BadRequest, parse_request  # noqa: E402
from longcat_lab.testing import random_model  # noqa: E402

NAME = "tiny-structured"
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
PAINT = {
    "type": "function",
    "function": {
        "name": "paint",
        "description": "Paint a wall.",
        "parameters": {
            "type": "object",
            "properties": {"color": {"enum": ["red", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
    },
}
TEXT = 'add paint color red blue name size tags items {"a": 1, "b": [2, 3]} true false null 0123456789'
SCHEMAS = {
    "string": {"type": "string", "maxLength": 8},
    "integer": {"type": "integer", "minimum": -20, "maximum": 300},
    "enum": {"enum": ["red", "green", "blue"]},
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "size": {
                "type": "object",
                "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
                "required": ["w", "ok"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "size"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"enum": ["red", "blue", 7]},
        "minItems": 1,
        "maxItems": 4,
    },
}


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    tok = train_tokenizer([TEXT] * 20, 400)
    config = dataclasses.replace(presets.tiny(), max_position_embeddings=2048)
    engine = Engine(random_model(config, seed=3), tok, NAME)
    srv = BackgroundServer(create_app(engine))
    srv.engine = engine
    yield srv
    srv.stop()


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def ask(server, **fields):
    messages = [{"role": "user", "content": "Answer in JSON."}]
    return client(server).chat.completions.create(model=NAME, messages=messages, **{"max_tokens": 400, **fields})


def post(server, **fields):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, **fields}
    return httpx.post(f"{server.url}/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_replies_parse(server, seed):
    choice = ask(server, response_format={"type": "json_object"}, seed=seed, temperature=1.0).choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_replies_validate(server, kind, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": kind, "schema": SCHEMAS[kind]}}
    choice = ask(server, response_format=fmt, seed=5, temperature=temperature).choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[kind])


def test_a_streamed_json_reply_parses(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "nested", "schema": SCHEMAS["nested"]}}
    chunks = list(ask(server, response_format=fmt, seed=1, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    jsonschema.validate(json.loads(text), SCHEMAS["nested"])


def check_call(choice, name_in: set[str]):
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name in name_in
    spec = {"add": ADD, "paint": PAINT}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    return call.function.name


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tool_choice_required_gives_a_valid_call(server, seed):
    choice = ask(server, tools=[ADD, PAINT], tool_choice="required", seed=seed, temperature=1.0).choices[0]
    check_call(choice, {"add", "paint"})


@pytest.mark.parametrize("name", ["add", "paint"])
def test_a_named_tool_choice_calls_that_tool(server, name):
    for seed in (0, 1):
        named = {"type": "function", "function": {"name": name}}
        choice = ask(server, tools=[ADD, PAINT], tool_choice=named, seed=seed, temperature=1.0).choices[0]
        assert check_call(choice, {name}) == name


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
            "nonsense",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format", "name"),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_object"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "rm"}}}, "tool_choice", "'rm'"),
        ({"tool_choice": "required"}, "tool_choice", "without tools"),
        ({"tools": [ADD], "tool_choice": "always"}, "tool_choice", "'required'"),
        (
            {"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "tool call",
        ),
    ],
    ids=["bad-schema", "no-name", "bad-type", "unknown-tool", "required-no-tools", "bad-choice", "both"],
)
def test_bad_structured_requests_are_400s_naming_the_field(server, fields, param, words):
    r = post(server, **fields)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"]


def test_two_constraints_in_one_batch_keep_their_own(server):
    """Both requests join one `BatchDecoder` before its first step (`run` with max_batch=2), so every step decodes
    both rows together; each reply validates against its own schema up to its end of turn."""
    engine = server.engine
    end = engine.tokenizer.token_to_id(END_OF_TURN)
    requests = [
        engine.parse(
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": kind, "schema": SCHEMAS[kind]}},
            }
        )
        for kind in ("nested", "array")
    ]
    sequences = [
        Sequence(r.prompt_ids, 120, 1.0, 1.0, torch.Generator().manual_seed(4), r.logits_mask) for r in requests
    ]
    for tokens, kind in zip(BatchDecoder(engine.model, 2).run(sequences), ("nested", "array")):
        assert end in tokens, kind
        text = engine.tokenizer.decode(tokens[: tokens.index(end)], skip_special_tokens=False)
        jsonschema.validate(json.loads(text), SCHEMAS[kind])


def test_auto_constrains_a_call_once_the_model_opens_one(server, monkeypatch):
    """The first token is forced to the open marker (a random model rarely writes it); from there the request's own
    hook (tool_choice "auto") must make the call valid, and the text after the call stays free."""
    engine = server.engine
    parse, opened = Engine.parse.__get__(engine), engine.tokenizer.token_to_id(TOOL_CALL_OPEN)

    def opening(hook):
        def mask(done, logits):
            logits = hook(done, logits) if hook is not None else logits
            if done:
                return logits
            out = torch.full_like(logits, float("-inf"))
            out[:, opened] = 0.0
            return out

        return mask

    monkeypatch.setattr(
        engine, "parse", lambda body: dataclasses.replace(p := parse(body), logits_mask=opening(p.logits_mask))
    )
    for seed in (0, 1, 2):
        choice = ask(server, tools=[ADD, PAINT], seed=seed, temperature=1.0, max_tokens=60).choices[0]
        check_call(choice, {"add", "paint"})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_format_with_tools_on_auto_is_that_json_or_a_call(server, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "nested", "schema": SCHEMAS["nested"]}}
    choice = ask(server, response_format=fmt, tools=[ADD, PAINT], seed=seed, temperature=1.0).choices[0]
    if choice.message.tool_calls:
        check_call(choice, {"add", "paint"})
    else:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS["nested"])


def test_without_the_constrained_decoder_only_auto_and_none_are_served(server):
    """As with --speculative (the engine then has no decoder): "auto" is unconstrained, the rest are 400s."""
    tok, body = server.engine.tokenizer, {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    assert parse_request({**body, "tools": [ADD]}, NAME, tok, 2048).logits_mask is None
    for fields, param in [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [ADD], "tool_choice": "required"}, "tool_choice"),
    ]:
        with pytest.raises(BadRequest, match="constrained decoding is off") as info:
            parse_request({**body, **fields}, NAME, tok, 2048)
        assert info.value.param == param
