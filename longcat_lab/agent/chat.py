"""`longcat-lab chat --ckpt RUN`: an interactive terminal chat (docs/design.md §18). Each line typed is a user
message; the reply streams as it is generated, in the chat template. With `--tools`, the calculator and/or a
domain's tools (`bank`, `shop`: a freshly designed database, whose customers are listed at the start) are offered
to the model: its calls are run and their results fed back until it replies without a call, and every refused or
malformed call is printed as a one-line tool error. `/reset` starts over, `/quit` (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from longcat_lab.chat import parse_assistant, render
from longcat_lab.tools import CALCULATOR, Registry

TOOLSETS = ("calculator", "bank", "shop")
PROMPT, MODEL = "you> ", "model> "


def build_tools(names: list[str], env_seed: int = 0) -> tuple[Registry, str, list[str]]:
    """(registry, system prompt, lines describing the databases) for the chosen toolsets."""
    from longcat_lab.synth.agents import ENVIRONMENTS, TaskDesigner

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
        parsed = parse_assistant(text, tools or [])
        messages.append(parsed.to_message())
        for call in parsed.tool_calls:
            result = registry.call(call["name"], call["arguments"])
            line = f"{call['name']} -> {result.to_text()}" if result.ok else result.error
            out.write(f"[tool{'' if result.ok else ' error'}] {line}\n")
            messages.append({"role": "tool", "content": result.to_text()})
        for error in parsed.errors:
            out.write(f"[tool error] {error}\n")
            messages.append({"role": "tool", "content": f"Error: {error}"})
        if not (parsed.tool_calls or parsed.errors):
            return
    out.write(f"[longcat-lab] the model kept calling tools for {max_rounds} replies; your turn\n")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat with a checkpoint in the terminal (streaming, optional tools)")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint folder or a run folder (its newest)")
    p.add_argument("--tools", nargs="*", default=[], metavar="NAME", help=f"any of {', '.join(TOOLSETS)}")
    p.add_argument("--system", help="system prompt (default: the chosen domains' policies)")
    p.add_argument("--env-seed", type=int, default=0, help="seed of the bank/shop database")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=192, metavar="N", help="longest reply")
    p.add_argument("--window", type=int, metavar="N", help="positions for prompt and reply (default: as trained)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    import torch

    from longcat_lab import checkpoint
    from longcat_lab._util import check_int, check_nonnegative, check_seed
    from longcat_lab.agent.policies import generate_reply
    from longcat_lab.eval.agentic import sft_window

    check_int("--max-new-tokens", args.max_new_tokens)
    check_nonnegative("--temperature", args.temperature)
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p={args.top_p!r} is not allowed: it must be in (0, 1]")
    check_seed("--seed", args.seed)
    if args.window is not None:
        check_int("--window", args.window, 2)
    registry, policy, notes = build_tools(args.tools, args.env_seed)
    ckpt = checkpoint.resolve(args.ckpt)
    model, tokenizer, meta = checkpoint.load(ckpt)
    torch.set_num_threads(1)  # decoding a lab-sized model is one small op after another (docs/design.md §13)
    generator = torch.Generator().manual_seed(args.seed)
    window = args.window or sft_window(ckpt)
    system = args.system if args.system is not None else policy

    def reply(prompt: str) -> str:
        def write(piece: str) -> None:
            out.write(piece)
            out.flush()

        options = {"temperature": args.temperature, "top_p": args.top_p, "window": window}
        return generate_reply(
            model, tokenizer, prompt, args.max_new_tokens, generator=generator, on_text=write, **options
        )

    def fresh() -> list[dict[str, Any]]:
        return [{"role": "system", "content": system}] if system else []

    out.write(
        f"[longcat-lab] chat with {ckpt} (step {meta.get('step')}); tools: {', '.join(registry.names) or 'none'}\n"
    )
    for note in notes:
        out.write(f"[longcat-lab] {note}\n")
    out.write("[longcat-lab] /reset starts over, /quit leaves\n")
    messages = fresh()
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            out.write("\n")
            return
        text = line.strip()
        if text == "/reset":
            messages = fresh()
            out.write("[longcat-lab] conversation cleared\n")
        elif text:
            messages.append({"role": "user", "content": text})
            respond(reply, messages, registry, out)


__all__ = ["TOOLSETS", "add_parser", "build_tools", "respond", "run"]
