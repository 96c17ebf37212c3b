"""The multi-agent synthesis loop (docs/design.md §5.3), each agent a small scripted program with one job:

- `TaskDesigner` samples a difficulty vector on the three axes and has the domain compose a task with its reference
  actions, reading the database directly;
- `UserSimulator` knows the user's scenario, reveals withheld details only when asked, changes its mind once when
  the scenario says so, and ends with `###STOP###`;
- `ExpertSolver` follows the domain's policy through tool calls only (identify and verify, ask what is missing,
  look things up with independent lookups in parallel, confirm, change, report) and so produces the reference
  dialogue;
- `verify` replays the task's reference actions and the dialogue's own tool calls on fresh environments and passes
  the dialogue when the end states hash equal and every required fact was told to the user.

Agents exchange structured values; the dialogue text is rendered from the domain's templates, so no language
model is needed. `pass_hat_k` is τ²-bench's pass^k.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from math import comb
from types import ModuleType
from typing import Any

from longcat_lab.synth import bank, shop
from longcat_lab.synth.env import STOP, Environment, Task

AXES = ("information", "toolset", "user")
LEVELS = (1, 2, 3)
DOMAINS: dict[str, ModuleType] = {"bank": bank, "shop": shop}
ENVIRONMENTS: dict[str, type[Environment]] = {"bank": bank.BankEnv, "shop": shop.ShopEnv}


class SolverError(RuntimeError):
    """The expert hit a tool error: a bug in the domain, never expected in a reference dialogue."""


class TaskDesigner:
    """Samples a difficulty vector (uniform over the 27 cells unless `weights` say otherwise) and a domain, then
    composes the task."""

    def __init__(self, seed: int = 0, domains: tuple[str, ...] = tuple(DOMAINS)):
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown or not domains:
            raise ValueError(f"domains={domains!r} is not allowed: each must be one of {tuple(DOMAINS)}")
        self.rng = random.Random(seed)
        self.domains = domains

    def design(self, index: int) -> Task:
        difficulty = {axis: self.rng.choice(LEVELS) for axis in AXES}
        domain = self.rng.choice(self.domains)
        design = bank.design_bank if domain == "bank" else shop.design_shop
        return design(self.rng, difficulty, f"{domain}-{index:06d}")


class UserSimulator:
    """The user: says the request (minus what it withholds), answers questions, changes its mind once, stops."""

    def __init__(self, task: Task):
        self.task, self.texts = task, DOMAINS[task.domain]
        self.scenario = task.user
        self.withheld = {task.user["clarify_slot"]} - {None}
        self.changed = False

    def opening(self) -> tuple[str, dict[str, Any]]:
        intent = self.task.intent
        revealed = {k: v for k, v in intent.items() if k not in self.withheld}
        text = self.texts.opening(intent, self.withheld)
        if not self.scenario["withhold_identity"]:
            text += " " + self.texts.user_says("identity", self.scenario["identity"])
            revealed |= self.scenario["identity"]
        return text, revealed

    def answer(self, question: str) -> tuple[str, dict[str, Any]]:
        """Reply to the agent's question ("identity", "clarify" or "confirm") with the text and what it reveals."""
        if question == "identity":
            return self.texts.user_says("identity", self.scenario["identity"]), dict(self.scenario["identity"])
        if question == "clarify":
            slot = self.scenario["clarify_slot"]
            value = self.task.intent[slot]
            return self.texts.user_says(slot, value), {slot: value}
        if self.scenario["change"] and not self.changed:
            self.changed = True
            ((slot, value),) = self.scenario["change"].items()
            return self.texts.user_says(slot, value, change=True), {slot: value}
        return "Yes, please go ahead.", {}

    def stop(self) -> str:
        return f"Thank you, that's all. {STOP}"


@dataclass
class ExpertSolver:
    """Plays the agent's side of one task against a fresh environment and returns the dialogue."""

    task: Task
    env: Environment = field(init=False)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        self.env = ENVIRONMENTS[self.task.domain](self.task.initial_state)
        self.registry = self.env.registry(self.task.tools)

    def say(self, role: str, text: str) -> None:
        self.messages.append({"role": role, "content": text})

    def call(self, calls: list[tuple[str, dict]]) -> list[Any]:
        """One assistant turn with these calls (in parallel when several), then one tool message per result."""
        self.messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls],
            }
        )
        out = []
        for name, arguments in calls:
            result = self.registry.call(name, arguments)
            self.say("tool", result.to_text())
            if not result.ok:
                raise SolverError(f"{self.task.task_id}: {result.error}")
            out.append(result.content)
        return out

    def run(self) -> list[dict[str, Any]]:
        expert, user = DOMAINS[self.task.domain].EXPERT, UserSimulator(self.task)
        self.say("system", self.env.policy)
        text, known = user.opening()
        self.say("user", text)
        if any(slot not in known for slot in expert.identity_slots):
            self.say("assistant", expert.identity_question)
            text, revealed = user.answer("identity")
            self.say("user", text)
            known |= revealed
        cid = expert.authenticate(self, known)
        for slot in expert.missing(known):
            self.say("assistant", expert.clarify_questions[slot])
            text, revealed = user.answer("clarify")
            self.say("user", text)
            known |= revealed
        while True:
            steps, confirmation = expert.plan(self, cid, known)
            self.say("assistant", confirmation + " Shall I go ahead?")
            text, revealed = user.answer("confirm")
            self.say("user", text)
            if not revealed:
                break
            known |= revealed
        results = [r for step in steps for r in self.call(step)]
        self.say("assistant", expert.report(results))
        self.say("user", user.stop())
        return self.messages


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]


def replay(task: Task, calls: list[dict[str, Any]]) -> tuple[Environment, list[Any]]:
    """Run `calls` ({"name", "arguments"}) on a fresh environment of the task; returns it and the results."""
    env = ENVIRONMENTS[task.domain](task.initial_state)
    registry = env.registry(task.tools, timeout_s=None)
    return env, [registry.call(c["name"], c["arguments"]) for c in calls]


def verify(task: Task, messages: list[dict[str, Any]]) -> Verdict:
    """τ²-bench-style check of one dialogue: its tool calls, replayed, agree with the tool messages it records and
    reach the same database as the reference actions; every `communicate_info` fact appears in an assistant
    message; the user ended the dialogue."""
    reasons = []
    target, ref_results = replay(task, task.actions)
    reasons += [f"reference action {i} failed: {r.error}" for i, r in enumerate(ref_results) if not r.ok]
    calls, recorded = [], []
    for m in messages:
        for c in m.get("tool_calls") or []:
            calls.append(c.get("function", c))
        if m.get("role") == "tool":
            recorded.append(m.get("content"))
    end, results = replay(task, calls)
    if [r.to_text() for r in results] != recorded:
        reasons.append("the dialogue's tool messages differ from what its calls return")
    if end.state_hash() != target.state_hash():
        reasons.append("end state differs from the reference actions' end state")
    said = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "assistant")
    reasons += [f"never told the user {fact!r}" for fact in task.communicate_info if fact not in said]
    if not messages or messages[-1].get("role") != "user" or STOP not in (messages[-1].get("content") or ""):
        reasons.append(f"the user did not end the dialogue with {STOP}")
    return Verdict(not reasons, reasons)


def pass_hat_k(successes: dict[str, list[bool]], k: int) -> float:
    """τ²-bench's pass^k: per task C(successes, k) / C(trials, k), averaged over tasks (every task needs at least
    k trials)."""
    if not successes:
        raise ValueError("successes={} is not allowed: give at least one task's trials")
    short = {t: len(v) for t, v in successes.items() if len(v) < k}
    if k < 1 or short:
        raise ValueError(f"k={k} is not allowed: it must be >= 1 and <= every task's trial count (short: {short})")
    return sum(comb(sum(v), k) / comb(len(v), k) for v in successes.values()) / len(successes)


def to_record(task: Task, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSONL record: OpenAI-style messages (tool-call arguments as objects), tool specs, difficulty, id."""
    env = ENVIRONMENTS[task.domain](task.initial_state)
    tools = [t.spec() for t in env.tools(task.tools)]
    return json.loads(
        json.dumps({"messages": messages, "tools": tools, "difficulty": task.difficulty, "task_id": task.task_id})
    )
