"""Tests of the agent loop (`longcat_lab.agent`): how an episode ends (the user stops, the turn limit, a full
context), malformed calls in the middle of an episode, the live user simulator against the expert's own
questions, the baselines, and the model's reply generation on a scripted stub model and a random tiny model.
Run: .venv/bin/python -m pytest tests/agent -q"""

import types

import pytest
import torch

from longcat_lab.agent import (
    STOP_REASONS,
    ContextFull,
    ExpertAgent,
    RandomValidAgent,
    SimulatedUser,
    generate_reply,
    play,
    policies,
    run_episode,
)
from longcat_lab.agent.loop import NOTHING_TO_ADD
from longcat_lab.agent.policies import random_arguments, reply_text
from longcat_lab.chat import END_OF_TURN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_call_block
from longcat_lab.model import presets
from longcat_lab.synth import STOP, ExpertSolver, TaskDesigner
from longcat_lab.synth.agents import DOMAINS


def tasks(n, seed=5, domains=("bank", "shop")):
    d = TaskDesigner(seed, domains)
    return [d.design(800_000 + i) for i in range(n)]


class Scripted:
    """An agent that says the given replies in order, then `then` forever."""

    def __init__(self, replies, then=""):
        self.replies, self.then, self.seen = list(replies), then, []

    def reply(self, messages, tools):
        self.seen.append(list(messages))
        return self.replies.pop(0) if self.replies else self.then


def test_expert_passes_every_task_through_the_live_loop():
    for task in tasks(60):
        ep = play(ExpertAgent(task), task)
        assert ep.passed, (task.task_id, ep.reasons)
        assert ep.stop_reason == "user_stop" and STOP in ep.messages[-1]["content"]
        assert ep.malformed == 0 and ep.tool_errors == 0
        reference = [m for m in ExpertSolver(task).run() if m["role"] == "assistant"]
        assert ep.turns == len(reference)


def test_a_final_message_ends_the_episode_and_fails_the_task():
    task = tasks(1)[0]
    ep = play(Scripted(["Done: all handled."]), task)
    assert (ep.stop_reason, ep.turns, ep.passed) == ("user_stop", 1, False)
    assert ep.messages[-1] == {"role": "user", "content": f"Thank you, that's all. {STOP}"}
    assert any("end state" in r for r in ep.reasons)


def test_the_turn_limit_ends_an_agent_that_never_stops():
    task = tasks(1, domains=("bank",))[0]
    call = tool_call_block("find_customer", {"name": "Nobody Here"})
    ep = play(Scripted([], then=call), task, max_turns=4)
    assert (ep.stop_reason, ep.turns, ep.tool_calls, ep.tool_errors, ep.passed) == ("turn_limit", 4, 4, 4, False)
    assert all(m["content"].startswith("Error: find_customer: no customer") for m in ep.messages if m["role"] == "tool")
    with pytest.raises(ValueError, match="max_turns"):
        play(Scripted([]), task, max_turns=0)


def test_a_full_context_ends_the_episode():
    class Full:
        def reply(self, messages, tools):
            raise ContextFull("no room")

    ep = play(Full(), tasks(1)[0])
    assert (ep.stop_reason, ep.turns, ep.passed) == ("context_full", 0, False)
    assert set(STOP_REASONS) == {"user_stop", "turn_limit", "context_full"}


@pytest.mark.parametrize(
    "bad, error",
    [
        (f"{TOOL_CALL_OPEN}\n{{not json\n{TOOL_CALL_CLOSE}", "invalid JSON"),
        (tool_call_block("launch_rocket", {}), "unknown tool 'launch_rocket'"),
        (f'{TOOL_CALL_OPEN}{{"name": "transfer", "arguments": "all of it"}}{TOOL_CALL_CLOSE}', "must be a JSON object"),
        (f"{TOOL_CALL_OPEN}[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_calls_mid_episode_get_an_error_back_and_the_episode_goes_on(bad, error):
    task = next(t for t in tasks(30, domains=("bank",)) if t.difficulty["user"] == 1)
    replies = ExpertAgent(task).replies
    agent = Scripted(replies[:2] + [bad, bad] + replies[2:])
    ep = play(agent, task)
    assert ep.passed, ep.reasons  # the verifier skips the feedback; the expert's dialogue is intact
    assert ep.malformed == 2 and ep.turns == len(replies) + 2
    feedback = [m for m in ep.messages if m.get("malformed")]
    assert len(feedback) == 2 and all(m["role"] == "tool" and error in m["content"] for m in feedback)
    # The agent read the error on its next turn: the message right after its bad reply.
    i = ep.messages.index(feedback[0])
    assert ep.messages[i - 1]["role"] == "assistant" and agent.seen[3][-1] is ep.messages[i]


def test_a_schema_invalid_call_is_run_as_an_error_and_does_not_change_the_database():
    task = next(t for t in tasks(30, domains=("bank",)) if t.difficulty["user"] == 1)
    replies = ExpertAgent(task).replies
    bad = tool_call_block("transfer", {"from_account": "A1", "to_account": "A2", "amount": "lots"})
    ep = play(Scripted(replies[:1] + [bad] + replies[1:]), task)
    assert ep.passed and ep.tool_errors == 1 and ep.malformed == 0
    assert any(m["content"].startswith("Error: transfer: amount:") for m in ep.messages if m["role"] == "tool")


def test_the_simulated_user_answers_the_experts_questions():
    for task in tasks(40):
        user, expert = SimulatedUser(task), DOMAINS[task.domain].EXPERT
        assert user.classify(expert.identity_question) == "identity"
        assert all(user.classify(q) == "clarify" for q in expert.clarify_questions.values())
        assert user.classify("To confirm: I will do it. Shall I go ahead?") == "confirm"
        assert user.classify("Done: I transferred 10; the new balance of A1 is 5.") == "final"
        text, done = user.respond(next(iter(expert.clarify_questions.values())))
        assert not done and (text == NOTHING_TO_ADD) == (task.user["clarify_slot"] is None)
        assert user.respond(expert.identity_question)[0].startswith("My ")


def test_the_random_valid_baseline_makes_schema_valid_calls():
    import random

    import jsonschema

    rng = random.Random(0)
    for task in tasks(20):
        for spec in ExpertSolver(task).registry.specs():
            schema = spec["function"]["parameters"]
            jsonschema.validate(random_arguments(rng, schema, ["C1", "x"], [5]), schema)
        ep = play(RandomValidAgent(seed=3), task)
        assert ep.malformed == 0 and ep.stop_reason in ("user_stop", "turn_limit")
        assert not any(m["content"].startswith("Error") and ": arguments" in m["content"] for m in ep.messages)


def test_reply_text_round_trips_an_assistant_message():
    from longcat_lab.chat import parse_assistant

    task = tasks(1)[0]
    for m in ExpertSolver(task).run():
        if m["role"] == "assistant":
            assert parse_assistant(reply_text(m)).to_message() == m


# Reply generation ------------------------------------------------------------------------------------------------
class _Tokenizer:
    """Each character is one token; the markers are single tokens with their own ids."""

    MARKERS = (END_OF_TURN, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<|endoftext|>")

    def token_to_id(self, marker):
        return 1000 + self.MARKERS.index(marker)

    def encode(self, text):
        return types.SimpleNamespace(ids=[ord(c) for c in text], offsets=[(i, i + 1) for i in range(len(text))])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.MARKERS[i - 1000] if i >= 1000 else chr(i) for i in ids)


class _StubModel:
    """Yields a fixed token sequence; records the prompt it was given."""

    def __init__(self, script, limit=64):
        self.script, self.prompts = script, []
        self.config = types.SimpleNamespace(max_position_embeddings=limit)
        self.device = torch.device("cpu")

    def stream(self, idx, max_new_tokens, **options):
        self.prompts.append((idx[0].tolist(), max_new_tokens))
        for t in self.script[:max_new_tokens]:
            yield torch.tensor([[t]])


def _ids(text):
    return _Tokenizer().encode(text).ids


@pytest.fixture
def stub_streams(monkeypatch):
    """`generate_reply` decodes through `inference.text.token_stream`: the stub model's tokens come from its script."""
    monkeypatch.setattr(policies, "token_stream", lambda model, idx, n, **options: model.stream(idx, n, **options))


@pytest.mark.parametrize(
    "script, expected",
    [
        (_ids("hello") + [1000] + _ids("junk"), "hello"),  # </longcat_s> ends the reply
        (_ids("hi") + [1003] + _ids("junk"), "hi"),  # so does the document separator
        ([1001] + _ids("{}") + [1002] + _ids("junk"), TOOL_CALL_OPEN + "{}" + TOOL_CALL_CLOSE),  # a call ends it
        (
            [1001, 120, 1002, 1001, 121, 1002, 1000],
            f"{TOOL_CALL_OPEN}x{TOOL_CALL_CLOSE}{TOOL_CALL_OPEN}y{TOOL_CALL_CLOSE}",
        ),
        (_ids("abcdefghij"), "abcdefgh"),  # max_new_tokens
    ],
)
def test_generate_reply_stops_where_a_reply_ends(script, expected, stub_streams):
    streamed = []
    model = _StubModel(script)
    assert generate_reply(model, _Tokenizer(), "p", max_new_tokens=8, on_text=streamed.append) == expected
    assert "".join(streamed) == expected


def test_generate_reply_keeps_the_end_of_a_long_prompt(stub_streams):
    model = _StubModel(_ids("ok") + [1000], limit=32)
    assert generate_reply(model, _Tokenizer(), "x" * 40 + "END", max_new_tokens=8) == "ok"
    prompt, new = model.prompts[0]
    assert len(prompt) == 24 and new == 8 and prompt[-3:] == _ids("END")
    generate_reply(model, _Tokenizer(), "short", max_new_tokens=100, window=10)
    assert model.prompts[1] == (_ids("short"), 5)  # at most half the window is spent on the reply


def test_run_episode_with_a_random_model_terminates(one_thread):
    from longcat_lab.data import DataConfig, load_tokenizer
    from longcat_lab.testing import random_model

    tok = load_tokenizer(512, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))
    model = random_model(presets.tiny(max_position_embeddings=4096), seed=1)  # a context that holds the task
    task = tasks(1)[0]
    ep = run_episode(model, tok, task, max_turns=3, max_new_tokens=12, temperature=1.0, seed=0)
    assert ep.stop_reason in ("user_stop", "turn_limit") and 1 <= ep.turns <= 3 and not ep.passed
    assert ep.messages[0]["role"] == "system" and ep.messages[2]["role"] == "assistant"
    # A window that cannot hold the tools and the user's request ends the episode before the model acts on a
    # prompt without them.
    ep = run_episode(model, tok, task, max_turns=3, max_new_tokens=12, window=128)
    assert (ep.stop_reason, ep.turns, ep.passed) == ("context_full", 0, False)
