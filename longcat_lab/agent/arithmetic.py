"""Arithmetic with and without the calculator tool (docs/design.md §5.5).

The problems are the reasoning corpus's word problems (`data.reasoning`), drawn from a seed of their own so they
are not the pre-training documents. Two chat forms of each, which `calculator_records` writes as fine-tuning
records (the same JSONL format as `longcat-lab synth`) and `arithmetic_exact_match` measures:
- without tools: the user asks the problem, the assistant writes the worked solution (`Step i: a op b = c` lines,
  then `Answer: N`), as in pre-training;
- with the calculator: the assistant calls `calculator` once with the whole computation as one expression, reads
  the result and answers `Answer: N`.
Exact match compares the last `Answer:` of the final reply with the reference; model text is only parsed. The
calculator calls are decoded under its schema unless `structured=False` (docs/design.md §5.2).

`longcat-lab arithmetic --n N --out FILE.jsonl [--seed S]` writes the records.
"""

from __future__ import annotations

import re
from typing import Any

from longcat_lab._util import check_int
from longcat_lab.agent.policies import generate_reply
from longcat_lab.agent.turn import tool_turn
from longcat_lab.chat import render
from longcat_lab.data.reasoning import SplitMix64, reasoning_problem
from longcat_lab.inference.structured import ToolCallDecoder
from longcat_lab.tools import CALCULATOR, Registry

# Fine-tuning records and the evaluation draw problems from different seeds; neither is the corpus's seed 0.
RECORD_SEED = 101
EVAL_SEED = 202
_STEP = re.compile(r"^Step \d+: (-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")
# The corpus's "/" divides exactly; "//" keeps the calculator's answer an integer.
_CALC_OP = {"+": "+", "-": "-", "*": "*", "/": "//"}


def problems(n: int, seed: int = EVAL_SEED) -> list[dict[str, Any]]:
    """n problems: {"question", "solution" (the worked steps and answer), "expression", "answer"}."""
    check_int("n", n)
    rng = SplitMix64(seed)
    out = []
    for _ in range(n):
        doc = reasoning_problem(rng)
        lines = doc.strip().splitlines()
        expression, previous = "", None
        for line in lines[1:-1]:
            a, op, b, c = _STEP.match(line).groups()
            left = f"({expression})" if previous is not None and a == previous else a
            right = f"({expression})" if previous is not None and b == previous and left == a else b
            expression, previous = f"{left} {_CALC_OP[op]} {right}", c
        out.append(
            {
                "question": lines[0][len("Problem: ") :],
                "solution": "\n".join(lines[1:]),
                "expression": expression,
                "answer": lines[-1][len("Answer: ") :],
            }
        )
    return out


def answer_of(text: str) -> str | None:
    """The number after the last `Answer:` in a reply, or None."""
    found = re.findall(r"Answer:\s*(-?\d+)", text)
    return found[-1] if found else None


def records(problem: dict[str, Any]) -> list[dict[str, Any]]:
    """The problem's two fine-tuning records: solved in steps without tools, and with one calculator call."""
    user = {"role": "user", "content": problem["question"]}
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": problem["expression"]}}}
    result = Registry([CALCULATOR], timeout_s=None).call("calculator", {"expression": problem["expression"]})
    return [
        {"messages": [user, {"role": "assistant", "content": problem["solution"]}], "tools": []},
        {
            "messages": [
                user,
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": result.to_text()},
                {"role": "assistant", "content": f"Answer: {result.content}"},
            ],
            "tools": [CALCULATOR.spec()],
        },
    ]


def calculator_records(n: int, seed: int = RECORD_SEED) -> list[dict[str, Any]]:
    """2n records (module docstring) with task ids `arith-{seed}-{i}-{form}`."""
    out = []
    for i, p in enumerate(problems(n, seed)):
        for form, r in zip(("steps", "calculator"), records(p), strict=True):
            out.append({**r, "task_id": f"arith-{seed}-{i:06d}-{form}"})
    return out


def solve(
    model,
    tokenizer,
    problem: dict[str, Any],
    use_calculator: bool,
    max_turns: int = 3,
    decoder: ToolCallDecoder | None = None,
    **generation,
) -> dict:
    """One problem as a chat: the model's replies (calls run by a calculator-only registry, their results fed
    back, decoded under the calculator's schema by `decoder` if given) until a reply without calls or
    `max_turns`; returns the transcript and whether the answer is exact."""
    registry = Registry([CALCULATOR] if use_calculator else [])
    tools = registry.specs() or None
    messages: list[dict[str, Any]] = [{"role": "user", "content": problem["question"]}]
    final = ""
    for _ in range(max_turns):
        constraint = decoder.constraint(tools) if decoder is not None and tools else None
        text = generate_reply(model, tokenizer, render(messages, tools), constraint=constraint, **generation)
        turn = tool_turn(text, registry, messages)
        final = turn.reply.content
        if not turn.called:
            break
    return {"messages": messages, "exact": answer_of(final) == problem["answer"]}


def arithmetic_exact_match(
    model,
    tokenizer,
    n: int = 32,
    seed: int = EVAL_SEED,
    transcripts: int = 2,
    structured: bool = True,
    **generation,
):
    """Exact match on n held-out problems without and with the calculator (greedy unless told otherwise; the
    calculator calls constrained to its schema unless not `structured`)."""
    decoder = ToolCallDecoder(tokenizer, model.config.vocab_size) if structured else None
    out = {}
    for name, use in (("without_calculator", False), ("with_calculator", True)):
        runs = [solve(model, tokenizer, p, use, decoder=decoder, **generation) for p in problems(n, seed)]
        exact = sum(r["exact"] for r in runs)
        calls = sum(len(m.get("tool_calls") or []) for r in runs for m in r["messages"])
        out[name] = {
            "problems": n,
            "exact": exact,
            "accuracy": exact / n,
            "tool_calls": calls,
            "transcripts": [r["messages"] for r in runs[:transcripts]],
        }
    return out


__all__ = ["EVAL_SEED", "RECORD_SEED", "answer_of", "arithmetic_exact_match", "calculator_records", "problems", "solve"]
