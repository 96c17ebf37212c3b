"""The agent loop (docs/design.md §5.5): an agent plays one synthesised task against the task's environment and a
live user simulator, and the verifier of docs/design.md §5.3 scores the dialogue.

One turn: the agent replies (text, tool-call blocks or both), and `agent.turn.tool_turn` parses the reply against
the offered tools, runs the well-formed calls in the environment's `Registry` and feeds back each result or
malformed-call error as a `tool` message. A reply with no call is said to the user, who answers a question and ends
the dialogue (`###STOP###`) on anything else. The episode ends when the user stops, at `max_turns` assistant turns,
or when the prompt no longer fits the model's context.

Agents are anything with `reply(messages, tools) -> str` (the text after ` ASSISTANT:`, without `</longcat_s>`):
`agent.policies` holds the model, the random-valid-call baseline and the expert.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from longcat_lab._util import check_int
from longcat_lab.agent.policies import ContextFull, ModelAgent
from longcat_lab.agent.turn import tool_turn
from longcat_lab.synth.agents import DOMAINS, ENVIRONMENTS, UserSimulator, verify
from longcat_lab.synth.env import STOP, Task

STOP_REASONS = ("user_stop", "turn_limit", "context_full")
# The expert dialogues have 5 to 15 assistant turns (measured over 300 seed-0 tasks); a few more leave room for a
# model's retries after a refused call.
DEFAULT_MAX_TURNS = 20
# What the user says to a clarifying question when nothing was withheld (or it was already told).
NOTHING_TO_ADD = "I have told you everything you need; please go on."
# Words that mark a confirmation request (the expert's is "To confirm: ... Shall I go ahead?").
CONFIRM_WORDS = ("confirm", "go ahead", "proceed", "shall i")
# A message without a question mark still asks when it shares this share of the words of an expert question.
ASKS = 0.5


class Agent(Protocol):
    def reply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str: ...


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9-]+", text.lower()) if len(w) > 2}


class SimulatedUser:
    """The synthesis user simulator (`synth.UserSimulator`) made live: it classifies each agent message as the
    identity question, a clarifying question, a confirmation request, or a final message, by comparing it with the
    domain expert's own questions (the phrasing the model was fine-tuned on), and answers as the simulator does."""

    def __init__(self, task: Task):
        self.sim = UserSimulator(task)
        expert = DOMAINS[task.domain].EXPERT
        self.identity = _words(expert.identity_question)
        self.clarify = [_words(q) for q in expert.clarify_questions.values()]
        self.clarified = False

    def opening(self) -> str:
        return self.sim.opening()[0]

    def classify(self, text: str) -> str:
        """ "confirm" (a confirmation request), "identity" or "clarify" (a question, or a message sharing at least
        half the words of one of the expert's questions: its identity request has no question mark), or "final"."""
        low = text.lower()
        if "?" in text and any(w in low for w in CONFIRM_WORDS):
            return "confirm"
        words = _words(text)
        identity = len(words & self.identity) / len(self.identity)
        clarify = max(len(words & q) / len(q) for q in self.clarify)
        if "?" not in text and max(identity, clarify) < ASKS:
            return "final"
        return "identity" if identity >= clarify else "clarify"

    def respond(self, text: str) -> tuple[str, bool]:
        """(the user's answer, whether it ends the dialogue)."""
        kind = self.classify(text)
        if kind == "final":
            return self.sim.stop(), True
        if kind == "clarify":
            if self.sim.scenario["clarify_slot"] is None or self.clarified:
                return NOTHING_TO_ADD, False
            self.clarified = True
        return self.sim.answer(kind)[0], False


@dataclass
class Episode:
    """One played task: the dialogue (OpenAI-style messages; malformed-call feedback marked `"malformed": True`),
    why it ended, counts, and the verifier's verdict."""

    task_id: str
    difficulty: dict[str, int]
    messages: list[dict[str, Any]]
    stop_reason: str
    turns: int  # assistant turns
    tool_calls: int  # calls that were run
    tool_errors: int  # calls that were run and returned an error (schema, policy, missing record)
    malformed: int  # call blocks that could not be parsed or named no offered tool
    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def cell(self) -> str:
        return cell_name(self.difficulty)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cell_name(difficulty: dict[str, int]) -> str:
    """ "i-t-u": the levels on the information, toolset and user axes."""
    return f"{difficulty['information']}-{difficulty['toolset']}-{difficulty['user']}"


def play(agent: Agent, task: Task, max_turns: int = DEFAULT_MAX_TURNS) -> Episode:
    """Play `task` with `agent` (module docstring) and verify the dialogue."""
    check_int("max_turns", max_turns)
    env = ENVIRONMENTS[task.domain](task.initial_state)
    registry = env.registry(task.tools)
    tools = registry.specs()
    user = SimulatedUser(task)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": env.policy},
        {"role": "user", "content": user.opening()},
    ]
    stop_reason, turns, calls, errors, malformed = "turn_limit", 0, 0, 0, 0
    while turns < max_turns:
        try:
            text = agent.reply(messages, tools)
        except ContextFull:
            stop_reason = "context_full"
            break
        turns += 1
        turn = tool_turn(text, registry, messages, tools)
        if turn.called:
            calls += len(turn.results)
            errors += sum(not result.ok for _, result in turn.results)
            malformed += len(turn.errors)
            continue
        answer, done = user.respond(turn.reply.content)
        messages.append({"role": "user", "content": answer})
        if done:
            stop_reason = "user_stop"
            break
    verdict = verify(task, [m for m in messages if not m.get("malformed")])
    return Episode(
        task.task_id,
        dict(task.difficulty),
        messages,
        stop_reason,
        turns,
        calls,
        errors,
        malformed,
        verdict.passed,
        verdict.reasons,
    )


def run_episode(model, tokenizer, task: Task, *, max_turns: int = DEFAULT_MAX_TURNS, **generation) -> Episode:
    """Play `task` with `model` (generation options as in `agent.policies.ModelAgent`: max_new_tokens,
    temperature, top_p, seed, on_text, structured)."""
    return play(ModelAgent(model, tokenizer, **generation), task, max_turns)


__all__ = [
    "DEFAULT_MAX_TURNS",
    "STOP",
    "STOP_REASONS",
    "Agent",
    "ContextFull",
    "Episode",
    "SimulatedUser",
    "cell_name",
    "play",
    "run_episode",
]
