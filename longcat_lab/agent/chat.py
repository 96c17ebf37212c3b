"""The interactive terminal chat of `longcat-lab chat --ckpt RUN` (docs/design.md §5.5). Each line typed is a user
message; the reply streams as it is generated, in the chat template. With `--tools`, the calculator and/or a
domain's tools (`bank`, `shop`: a freshly designed database, whose customers are listed at the start) are offered
to the model: its calls are run and their results fed back until it replies without a call, and every refused or
malformed call is printed as a one-line tool error. `/reset` starts over, `/quit` (or end of input) leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TextIO

from longcat_lab._util import check_text
from longcat_lab.agent.turn import tool_turn
from longcat_lab.chat import render
from longcat_lab.synth.agents import ENVIRONMENTS, TaskDesigner
from longcat_lab.tools import CALCULATOR, Registry

TOOLSETS = ("calculator", "bank", "shop")
PROMPT, MODEL = "you> ", "model> "


def build_tools(names: list[str], env_seed: int = 0) -> tuple[Registry, str, list[str]]:
    """(registry, system prompt, lines describing the databases) for the chosen toolsets."""
    unknown = [n for n in names if n not in TOOLSETS]
    if unknown:
        raise ValueError(f"--tools={unknown[0]!r} is not allowed: choose from {', '.join(TOOLSETS)}")
    registry, policies, notes = Registry(), [], []
    for name in dict.fromkeys(names):
        if name == "calculator":
            registry.add(CALCULATOR)
            continue
        state = TaskDesigner(env_seed, (name,)).design(0).initial_state
        env = ENVIRONMENTS[name](state)
        for t in env.tools():
            registry.add(t)
        policies.append(env.policy)
        people = ", ".join(
            f"{c['name']} (PIN {c['pin']})" if "pin" in c else f"{c['email']} (postcode {c['zip']})"
            for c in state["customers"].values()
        )
        notes.append(f"{name} database (seed {env_seed}): customers {people}")
    return registry, " ".join(policies), notes


def respond(
    reply: Callable[[str], str], messages: list[dict[str, Any]], registry: Registry, out: TextIO, max_rounds: int = 4
) -> None:
    """The assistant's side of one user message: `reply(prompt)` (which streams its text to `out`), its calls run
    and fed back, for up to `max_rounds` replies. Appends every message to `messages`."""
    tools = registry.specs() or None
    for _ in range(max_rounds):
        out.write(MODEL)
        out.flush()
        text = reply(render(messages, tools, add_generation_prompt=True))
        out.write("\n")
        turn = tool_turn(text, registry, messages)
        for call, result in turn.results:
            line = f"{call['name']} -> {result.to_text()}" if result.ok else result.error
            out.write(f"[tool{'' if result.ok else ' error'}] {line}\n")
        for error in turn.errors:
            out.write(f"[tool error] {error}\n")
        if not turn.called:
            return
    out.write(f"[longcat-lab] the model kept calling tools for {max_rounds} replies; your turn\n")


def converse(reply: Callable[[str], str], registry: Registry, system: str | None, stdin: TextIO, out: TextIO) -> None:
    """The conversation loop: each line read from `stdin` is a user message answered by `respond`; `/reset`
    starts over (with the `system` prompt, if any), `/quit` or the end of input leaves."""

    def fresh() -> list[dict[str, Any]]:
        return [{"role": "system", "content": system}] if system else []

    out.write("[longcat-lab] /reset starts over, /quit leaves\n")
    if hasattr(stdin, "reconfigure"):  # a byte that is not UTF-8 must cost one line, not the conversation
        stdin.reconfigure(errors="surrogateescape")
    messages = fresh()
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            out.write("\n")
            return
        text = line.strip()
        try:
            check_text("that line", text)
        except ValueError as err:
            out.write(f"[longcat-lab] {err}; type it again\n")
            continue
        if text == "/reset":
            messages = fresh()
            out.write("[longcat-lab] conversation cleared\n")
        elif text:
            messages.append({"role": "user", "content": text})
            respond(reply, messages, registry, out)


__all__ = ["MODEL", "PROMPT", "TOOLSETS", "build_tools", "converse", "respond"]
