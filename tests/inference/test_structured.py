"""Structured decoding of tool calls (`longcat_lab.inference.structured`): whatever a random model writes after the
open marker parses and validates against the offered tool's schema (hypothesis over schemas of the kinds our tools
produce, under greedy, top-p sampling, with and without the KV cache); the expert's calls as the template renders
them pass the mask token by token; outside a call the tokens are exactly the unconstrained ones; without
constraints decoding is today's. Run: .venv/bin/python -m pytest tests/inference/test_structured.py -q
"""

from __future__ import annotations

import functools
import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat_lab.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_assistant
from longcat_lab.data.tokenizer import train_tokenizer
from longcat_lab.inference.generate import generate, stream
from longcat_lab.inference.structured import MAX_INTEGER, MAX_ITEMS, MAX_STRING, ToolCallDecoder, bounded, call_schema
from longcat_lab.inference.text import token_stream
from longcat_lab.synth.agents import ENVIRONMENTS, ExpertSolver, TaskDesigner
from longcat_lab.testing import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SETTINGS = settings(
    max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def domain_tools(domain: str) -> list[dict]:
    env = ENVIRONMENTS[domain](TaskDesigner(0, (domain,)).design(0).initial_state)
    return [t.spec() for t in env.tools()]


@functools.cache
def tokenizer():
    """A 512-token BPE (the tiny preset's vocabulary) trained on the domains' tool specs and some prose."""
    texts = [json.dumps(domain_tools(d)) for d in ("bank", "shop")] * 3
    return train_tokenizer(texts + ["Hello, how can I help you today? 0123456789 {}[]"], 512)


@functools.cache
def decoder() -> ToolCallDecoder:
    return ToolCallDecoder(tokenizer(), 512)


# Argument schemas of the kinds `tools.registry.type_schema` produces, bounded so that every call ends within the
# token budget a test gives it.
leaf = st.one_of(
    st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.integers(-50, 0).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 99}),
    st.lists(st.sampled_from(["red", "green", "blue", "x y"]), min_size=1, max_size=3, unique=True).map(
        lambda e: {"enum": e}
    ),
    st.just({"type": "boolean"}),
    st.just({"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}),
)


def obj(children):
    props = st.dictionaries(st.sampled_from(["a", "b", "id", "name", "qty"]), children, min_size=1, max_size=3)
    return props.flatmap(
        lambda p: st.lists(st.sampled_from(sorted(p)), unique=True).map(
            lambda req: {"type": "object", "properties": p, "required": req, "additionalProperties": False}
        )
    )


value = st.recursive(
    leaf, lambda c: st.one_of(obj(c), c.map(lambda s: {"type": "array", "items": s, "maxItems": 2})), max_leaves=4
)
tool_sets = st.lists(obj(value), min_size=1, max_size=3).map(
    lambda ps: [{"type": "function", "function": {"name": f"tool_{i}", "parameters": p}} for i, p in enumerate(ps)]
)


def constrained_call(model, tools, seed, budget=160, **options):
    """The text a constrained model writes after the open marker (ended by the grammar or the budget)."""
    tok = tokenizer()
    c = decoder().constraint(tools)
    c.advance(decoder().open_id)
    idx = torch.tensor([tok.encode("USER: go ASSISTANT:").ids + [decoder().open_id]])
    ids = []
    generator = torch.Generator().manual_seed(seed)
    for token in stream(model, idx, budget, constraints=[c], generator=generator, **options):
        ids.append(int(token))
        if not c.in_call:
            break
    assert c.error is None
    return tok.decode(ids, skip_special_tokens=False), c


@SETTINGS
@given(tools=tool_sets, seed=st.integers(0, 3), mode=st.sampled_from(["greedy", "top_p", "no_cache"]))
def test_constrained_calls_always_parse_and_validate(tools, seed, mode):
    options = {"greedy": {}, "top_p": {"temperature": 1.0, "top_p": 0.9}, "no_cache": {"use_cache": False}}[mode]
    text, c = constrained_call(random_model(seed=seed), tools, seed, **options)
    assert not c.in_call and text.endswith(TOOL_CALL_CLOSE), text  # the grammar is finite: the call ended
    parsed = parse_assistant(TOOL_CALL_OPEN + text, tools)
    assert parsed.ok and len(parsed.tool_calls) == 1, (text, parsed.errors)
    call = parsed.tool_calls[0]
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call["name"])
    jsonschema.validate(call["arguments"], schema)
    jsonschema.validate(json.loads(text.strip()[: -len(TOOL_CALL_CLOSE)]), call_schema(tools))


def test_real_tool_schemas_give_a_valid_prefix_and_take_every_expert_call():
    tools = domain_tools("shop")
    text, c = constrained_call(random_model(seed=3), tools, 0, budget=48, temperature=1.0)
    assert text.startswith('\n{"name": "') and c.error is None
    cached, _ = constrained_call(random_model(seed=3), tools, 0, budget=24)
    assert constrained_call(random_model(seed=3), tools, 0, budget=24, use_cache=False)[0] == cached  # same greedy
    tok = tokenizer()
    for domain in ("bank", "shop"):
        task = TaskDesigner(0, (domain,)).design(1)
        offered = domain_tools(domain)
        for m in ExpertSolver(task).run():
            for call in m.get("tool_calls") or []:
                f = call.get("function", call)
                body = "\n" + json.dumps({"name": f["name"], "arguments": f["arguments"]}, ensure_ascii=False) + "\n"
                c = decoder().constraint(offered)
                c.advance(decoder().open_id)
                for t in [*tok.encode(body).ids, decoder().close_id]:
                    assert c.allowed()[t], (body, tok.decode([t]))
                    c.advance(t)
                assert not c.in_call and c.error is None


@pytest.mark.parametrize("favourite", ["}", "9"])
def test_a_call_that_repeats_one_character_still_ends(favourite):
    # The real tools' schemas bound no string or integer; a model that always picks `favourite` where the grammar
    # lets it (a string character, a digit) once wrote `"order_id": "U40}}}}...` until its budget cut the call off.
    # `bounded` ends every such value, so the call closes, parses and validates.
    tok, d = tokenizer(), decoder()
    (pick,) = tok.encode(favourite).ids
    for domain in ("bank", "shop"):
        tools = domain_tools(domain)
        for tool in tools:
            c = d.constraint(tools)
            c.advance(d.open_id)
            ids = []
            prefix = tok.encode('\n{"name": "' + tool["function"]["name"] + '", "arguments": ').ids
            for t in prefix:  # the call to this tool, then the adversary
                c.advance(t)
            ids += prefix
            while c.in_call:
                assert len(ids) < 2000, tok.decode(ids[-40:])
                allowed = c.allowed()
                t = pick if allowed[pick] else int(allowed.nonzero()[0, 0])
                c.advance(t)
                ids.append(t)
            text = tok.decode(ids, skip_special_tokens=False)
            parsed = parse_assistant(TOOL_CALL_OPEN + text, tools)
            assert c.error is None and parsed.ok and len(parsed.tool_calls) == 1, (text, parsed.errors)
            jsonschema.validate(parsed.tool_calls[0]["arguments"], tool["function"]["parameters"])


def test_past_close_after_a_call_closes_the_shortest_way():
    # An agent's reply budget runs out in the middle of a call, in a string or between keys: from there the call
    # takes the shortest way out (a string closes at once, a required key still missing gets its shortest value),
    # whatever the model prefers (random logits here), and parses and validates.
    tok, d = tokenizer(), decoder()
    g = torch.Generator().manual_seed(0)
    for domain in ("bank", "shop"):
        tools = domain_tools(domain)
        for tool in tools:
            f = tool["function"]
            first = next(iter(f["parameters"]["properties"]))
            for cut in ('", "arguments": {', f'", "arguments": {{"{first}": "U4', f'", "arguments": {{"{first}'):
                c = d.constraint(tools)
                c.advance(d.open_id)
                prefix = tok.encode('\n{"name": "' + f["name"] + cut).ids
                if not all(c.allowed()[t] and (c.advance(t) or True) for t in prefix):
                    continue  # this cut is not a prefix of a valid call to this tool (an integer first argument)
                c.close_after = c.tokens
                ids = list(prefix)
                while c.in_call:
                    assert len(ids) - len(prefix) <= 40, tok.decode(ids)
                    t = int(c.mask(torch.randn(512, generator=g)).argmax())
                    c.advance(t)
                    ids.append(t)
                text = tok.decode(ids, skip_special_tokens=False)
                parsed = parse_assistant(TOOL_CALL_OPEN + text, tools)
                assert c.error is None and parsed.ok and len(parsed.tool_calls) == 1, (text, parsed.errors)
                jsonschema.validate(parsed.tool_calls[0]["arguments"], f["parameters"])


def test_bounded_adds_bounds_only_where_a_schema_has_none():
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "short": {"type": "string", "maxLength": 4},
            "n": {"type": ["integer", "null"], "maximum": 7},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["a", "b"]},
            "either": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }
    out = bounded(schema)
    p = out["properties"]
    assert p["s"]["maxLength"] == MAX_STRING and p["short"]["maxLength"] == 4
    assert p["n"]["maximum"] == 7 and p["n"]["minimum"] == -MAX_INTEGER
    assert p["tags"]["maxItems"] == MAX_ITEMS and p["tags"]["items"]["maxLength"] == MAX_STRING
    assert p["kind"] == {"enum": ["a", "b"]} and p["either"]["anyOf"][0]["maxLength"] == MAX_STRING
    assert "maxLength" not in schema["properties"]["s"]  # a copy: the tool's own schema is unchanged


def test_outside_a_call_the_tokens_are_the_unconstrained_ones():
    tok, open_id = tokenizer(), decoder().open_id
    model = random_model(seed=1)
    with torch.no_grad():
        model.lm_head.weight[open_id] *= 16  # the open marker becomes likely enough to appear in a short run
    idx = torch.tensor([tok.encode("USER: hello ASSISTANT:").ids])
    options = {"temperature": 1.0, "top_p": 0.95}
    free = generate(model, idx, 60, generator=torch.Generator().manual_seed(2), **options)[0, idx.shape[1] :].tolist()
    assert open_id in free, "the run must reach a call for the test to mean something"
    first = free.index(open_id)
    c = decoder().constraint(domain_tools("bank"))
    constrained = generate(model, idx, 60, constraints=[c], generator=torch.Generator().manual_seed(2), **options)
    constrained = constrained[0, idx.shape[1] :].tolist()
    assert constrained[: first + 1] == free[: first + 1]
    text = tok.decode(constrained[first:], skip_special_tokens=False)
    assert text.startswith(TOOL_CALL_OPEN + '\n{"name": "')


def test_constraints_are_per_row_in_a_batch():
    model, tools = random_model(seed=4), domain_tools("bank")
    open_id = decoder().open_id
    idx = torch.tensor([tokenizer().encode("USER: hi ASSISTANT:").ids + [open_id]] * 2)
    c = decoder().constraint(tools)
    c.advance(open_id)
    both = generate(model, idx, 24, constraints=[c, None])[:, idx.shape[1] :]
    free = generate(model, idx[1:], 24)[0, idx.shape[1] :]
    assert torch.equal(both[1], free)  # the free row decodes as if alone
    assert tokenizer().decode(both[0].tolist()).startswith('\n{"name": "') and c.error is None


def test_without_constraints_decoding_is_unchanged():
    model, idx = random_model(seed=2), torch.tensor([[5, 6, 7]])
    ids, logits = generate(model, idx, 12, return_logits=True)
    ids2, logits2 = generate(model, idx, 12, return_logits=True, constraints=[None])
    assert torch.equal(ids, ids2) and torch.equal(logits, logits2)
    c = decoder().constraint(domain_tools("bank"))
    assert torch.equal(generate(model, idx, 12, constraints=[c]), ids)  # no open marker: mask never applied


def test_a_token_outside_the_mask_is_reported_and_the_next_call_is_constrained_again():
    d = decoder()
    c = d.constraint(domain_tools("bank"))
    c.advance(d.open_id)
    assert not c.allowed()[d.close_id]
    c.advance(d.close_id)  # a caller that sampled without the mask
    assert c.error and not c.in_call and torch.equal(c.mask(torch.zeros(512)), torch.zeros(512))
    c.advance(d.open_id)
    allowed = c.allowed().nonzero()[:, 0].tolist()
    assert c.in_call and allowed and all(tokenizer().decode([t]).startswith("\n") for t in allowed)


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"tools=\[\] is not allowed"):
        decoder().constraint([])
    with pytest.raises(ValueError, match="offered twice"):
        decoder().constraint(domain_tools("bank") + domain_tools("bank")[:1])
    with pytest.raises(ValueError, match="vocab_size=100 is not allowed"):
        ToolCallDecoder(tokenizer(), 100)
    model, idx = random_model(), torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="constraints has 2 entries"):
        next(stream(model, idx, 2, constraints=[None, None]))
    with pytest.raises(ValueError, match="speculative=True"):
        token_stream(model, idx, 2, speculative=True, constraints=[None])
