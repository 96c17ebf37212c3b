"""The model agent with structured tool calls (`agent.policies.ModelAgent(structured=...)`, docs/design.md §5.2): a
random model that opens calls often writes calls that parse and name an offered tool when constrained, and malformed
ones when free; with the switch off a reply is exactly `generate_reply`'s unconstrained one; the chat command and
`eval --agentic` take the switch. Run: .venv/bin/python -m pytest tests/agent/test_structured_agent.py -q"""

import functools

import pytest
import torch

from longcat_lab.agent import ModelAgent, generate_reply, play
from longcat_lab.agent.policies import CALL_ALLOWANCE, ContextFull, prompt_ids
from longcat_lab.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_assistant, render
from longcat_lab.cli import main
from longcat_lab.inference.structured import ToolCallDecoder
from longcat_lab.model import presets
from longcat_lab.synth import TaskDesigner
from longcat_lab.testing import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_mode",
            "parameters": {
                "type": "object",
                "properties": {"mode": {"enum": ["on", "off"]}, "level": {"type": "integer", "maximum": 9}},
                "required": ["mode"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Switch it on, please."}]


@functools.cache
def tokenizer():
    from longcat_lab.data import DataConfig, load_tokenizer

    return load_tokenizer(512, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))


def caller(seed: int = 1):
    """A random tiny model whose open-call marker is likely (its output row scaled up), with a context that holds
    a whole task's prompt (the preset's weights: the context length sizes none)."""
    model = random_model(presets.tiny(max_position_embeddings=4096), seed=seed)
    with torch.no_grad():
        model.lm_head.weight[tokenizer().token_to_id(TOOL_CALL_OPEN)] *= 16
    return model


def test_constrained_calls_parse_where_free_ones_do_not():
    """Every constrained call that reached its closing marker parses (one cut off by max_new_tokens cannot); the
    same model decoding freely writes no call that parses."""
    model, calls, errors = caller(), {True: 0, False: 0}, {True: 0, False: 0}
    decoder = ToolCallDecoder(tokenizer(), model.config.vocab_size)
    for seed in range(4):
        for structured in (decoder, False):
            agent = ModelAgent(model, tokenizer(), temperature=1.0, seed=seed, structured=structured, max_new_tokens=64)
            reply = agent.reply(MESSAGES, TOOLS)
            parsed = parse_assistant(reply, TOOLS)
            if structured:
                cut_off = reply.rfind(TOOL_CALL_OPEN) > reply.rfind(TOOL_CALL_CLOSE)
                assert len(parsed.tool_calls) == reply.count(TOOL_CALL_CLOSE), reply
                assert len(parsed.errors) == cut_off, (reply, parsed.errors)
            calls[bool(structured)] += len(parsed.tool_calls)
            errors[bool(structured)] += len(parsed.errors)
    assert calls[True] >= 2 and calls[False] == 0 and errors[False] >= 4, (calls, errors)


def test_the_token_budget_lets_a_constrained_call_close():
    """A reply's budget runs out mid-call: the call under way goes on to its closing marker and parses, no call
    starts past the budget."""
    model = caller()
    decoder = ToolCallDecoder(tokenizer(), model.config.vocab_size)
    closed = 0
    for seed in range(10):
        agent = ModelAgent(model, tokenizer(), temperature=1.0, seed=seed, structured=decoder, max_new_tokens=8)
        reply = agent.reply(MESSAGES, TOOLS)
        parsed = parse_assistant(reply, TOOLS)
        assert reply.count(TOOL_CALL_OPEN) == reply.count(TOOL_CALL_CLOSE) and parsed.ok, reply
        closed += len(parsed.tool_calls)
    assert closed >= 2  # every call here is longer than the budget of 8 tokens


def test_the_window_keeps_room_for_a_call_to_close():
    """A prompt that leaves room for the budget but not for closing a call: an agent (whole prompt) stops as context
    full under a constraint and goes on without one; a chat keeps fewer of the prompt's tokens instead."""
    model, tok = caller(), tokenizer()
    decoder = ToolCallDecoder(tok, model.config.vocab_size)
    prompt = render(MESSAGES, TOOLS)
    n = len(prompt_ids(tok, prompt))
    window = n + 8 + CALL_ALLOWANCE  # room for the prompt, the budget of 8 tokens and the allowance
    free = generate_reply(model, tok, prompt, 8, window=n + 8, whole_prompt=True)  # room for the budget alone
    assert isinstance(free, str)
    with pytest.raises(ContextFull, match="positions; the window has"):
        generate_reply(model, tok, prompt, 8, window=n + 8, whole_prompt=True, constraint=decoder.constraint(TOOLS))
    reply = generate_reply(
        model, tok, prompt, 8, window=window, whole_prompt=True, constraint=decoder.constraint(TOOLS)
    )
    assert reply.count(TOOL_CALL_OPEN) == reply.count(TOOL_CALL_CLOSE) and parse_assistant(reply, TOOLS).ok, reply


def test_switched_off_a_reply_is_the_unconstrained_one():
    model = caller()
    agent = ModelAgent(model, tokenizer(), temperature=1.0, seed=3, structured=False, max_new_tokens=40)
    generator = torch.Generator().manual_seed(3)
    prompt = render(MESSAGES, TOOLS)
    expected = generate_reply(model, tokenizer(), prompt, 40, temperature=1.0, generator=generator)
    assert agent.reply(MESSAGES, TOOLS) == expected and TOOL_CALL_OPEN in expected
    assert ModelAgent(model, tokenizer(), structured=True).decoder is not None  # on by default
    assert ModelAgent(model, tokenizer()).decoder is not None


def test_a_structured_episode_has_no_malformed_call_but_truncated_ones():
    task = TaskDesigner(5, ("bank",)).design(800_000)
    episode = play(ModelAgent(caller(2), tokenizer(), temperature=1.0, max_new_tokens=48), task, 3)
    assert episode.turns >= 1
    for m in episode.messages:
        if m.get("malformed"):  # only a call cut off by max_new_tokens can fail to parse
            assert "invalid JSON" in m["content"], m["content"]


def test_the_commands_take_the_switch(capsys):
    assert main(["chat", "--ckpt", "nowhere", "--no-structured", "--tools", "web"]) == 2
    assert "--tools='web'" in capsys.readouterr().err  # the switch itself parses
    with pytest.raises(SystemExit):
        main(["eval", "--agentic", "--ckpt", "nowhere", "--structured", "sometimes"])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err
