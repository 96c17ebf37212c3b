"""The agents that play tasks in the loop (docs/design.md §5.5), each with `reply(messages, tools) -> str`:

- `ModelAgent`: a `LongCatLM` renders the conversation with the chat template and generates the reply
  (`generate_reply`, which the chat command streams to the terminal, in the window `sft_window` reads off the
  checkpoint); by default its tool calls are decoded under the offered tools' schemas (`inference.structured`);
- `RandomValidAgent`: the floor, calls offered tools at random with arguments that satisfy their schemas (strings
  and numbers taken from the conversation so far), then ends;
- `ExpertAgent`: the ceiling, replays the expert solver's reference replies for the task.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longcat_lab._util import check_int, check_nonnegative
from longcat_lab.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, encode_chat, render, tool_call_block
from longcat_lab.inference.structured import ToolCallConstraint, ToolCallDecoder
from longcat_lab.inference.text import TextStream, reply_stop_ids, token_stream
from longcat_lab.synth.agents import ExpertSolver
from longcat_lab.synth.env import Task

# Tokens a constrained call under way may take past a reply's budget to reach its closing marker, which it takes the
# shortest way (a string closes at once, each required key still missing gets its shortest value): a call cut in
# half does not parse. Every call to our tools closes so within 40 tokens where tests/inference cuts it off.
CALL_ALLOWANCE = 64


class ContextFull(RuntimeError):
    """The conversation no longer fits the model's context: the episode ends (stop reason `context_full`)."""


def prompt_ids(tokenizer, prompt: str, keep: int | None = None) -> list[int]:
    """The prompt's ids, encoded as one string as the fine-tuning data encodes a dialogue (docs/design.md §5.4);
    only the last `keep` when given (a chat goes on past its context by forgetting its start)."""
    ids = encode_chat(tokenizer, prompt).ids
    return ids if keep is None else ids[-keep:]


def generate_reply(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 192,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_text: Callable[[str], None] | None = None,
    window: int | None = None,
    constraint: ToolCallConstraint | None = None,
    whole_prompt: bool = False,
) -> str:
    """The assistant reply the model generates after `prompt` (which ends with ` ASSISTANT:`): until
    `</longcat_s>`, the document separator, a closing tool-call marker that no further call follows, or
    `max_new_tokens`. The prompt and the reply share `window` positions (default: the model's
    max_position_embeddings); a longer prompt keeps its last tokens. `on_text` receives the text as it grows. A
    fresh `constraint` (`ToolCallDecoder.constraint(tools)`) decodes the reply's tool calls under their schemas, and
    a call under way when `max_new_tokens` runs out closes the shortest way (`ToolCallConstraint.closing`) within
    CALL_ALLOWANCE more tokens, for which the prompt keeps room in the window; no call starts past the budget.
    With `whole_prompt` a prompt that would lose its start raises `ContextFull` instead (an agent's)."""
    window = window or model.config.max_position_embeddings
    check_int("window", window, 2)
    max_new_tokens = min(max_new_tokens, window // 2)
    # The room a reply keeps: its budget and, under a constraint, the allowance to close a call, so that a call is
    # never cut off by the window; the prompt keeps at least half the window.
    allowance = min(CALL_ALLOWANCE, window // 2 - max_new_tokens) if constraint is not None else 0
    room = max_new_tokens + allowance
    ids = prompt_ids(tokenizer, prompt)
    if whole_prompt and len(ids) + room > window:
        raise ContextFull(f"the prompt and the reply need {len(ids) + room} positions; the window has {window}")
    ids = ids[-(window - room) :]
    close, reopen = tokenizer.token_to_id(TOOL_CALL_CLOSE), tokenizer.token_to_id(TOOL_CALL_OPEN)

    def ends(kept: list[int], token: int) -> bool:
        # Calls end a reply (the template puts only `</longcat_s>` after them), unless another call follows.
        if kept and kept[-1] == close and token != reopen:
            return True
        # Past the budget only the call under way goes on, up to its closing marker.
        return len(kept) >= max_new_tokens and kept.count(reopen) <= kept.count(close)

    idx = torch.tensor([ids], dtype=torch.long, device=model.device)
    options = {"temperature": temperature, "top_p": top_p, "generator": generator}
    if constraint is not None:
        constraint.close_after = max_new_tokens  # past the budget a call under way closes the shortest way
        options["constraints"] = [constraint]
    tokens = token_stream(model, idx, max_new_tokens + allowance, **options)
    return TextStream(tokenizer, tokens, reply_stop_ids(tokenizer), ends).follow(on_text)


def sft_window(ckpt: Path) -> int | None:
    """The sequence length a checkpoint last trained on (its last stage), the window its replies are generated in;
    None when its train_config.json does not say."""
    try:
        stages = json.loads((Path(ckpt) / "train_config.json").read_text())["stages"]
        return int(stages[-1]["seq_len"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


class ModelAgent:
    """A model as the agent: each reply is generated from the whole conversation rendered with the tools. With
    `structured` (True, or a `ToolCallDecoder` to share between agents) a reply's tool calls are decoded under the
    offered tools' schemas; False decodes freely, as the model alone would."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int = 192,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        window: int | None = None,
        on_text: Callable[[str], None] | None = None,
        structured: bool | ToolCallDecoder = True,
    ):
        check_int("max_new_tokens", max_new_tokens)
        check_nonnegative("temperature", temperature)
        self.model, self.tokenizer = model, tokenizer
        self.options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "window": window}
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        self.on_text = on_text
        if structured is True:
            structured = ToolCallDecoder(tokenizer, model.config.vocab_size)
        self.decoder = structured or None

    def reply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        prompt = render(messages, tools or None, add_generation_prompt=True)
        constraint = self.decoder.constraint(tools) if self.decoder is not None and tools else None
        return generate_reply(
            self.model,
            self.tokenizer,
            prompt,
            generator=self.generator,
            on_text=self.on_text,
            constraint=constraint,
            # An agent acts on what the whole conversation says (the tools, the user's details), so a prompt that
            # would lose its start to the window ends the episode instead (docs/design.md §5.5).
            whole_prompt=True,
            **self.options,
        )


def _candidates(messages: list[dict[str, Any]]) -> tuple[list[str], list[int]]:
    """Strings and integers a random caller could pass: ids, e-mails, names and numbers seen in the conversation."""
    text = "\n".join(m.get("content") or "" for m in messages if m.get("role") != "system")
    strings = set(re.findall(r"\b[A-Z]+\d+\b|[\w.+-]+@[\w.-]+\w|\b[A-Z][a-z]+ [A-Z][a-z]+\b", text))
    strings |= {s for s in re.findall(r'"([^"\n]{1,40})"', text)}
    numbers = {int(n) for n in re.findall(r"(?<![\w.])\d{1,6}(?![\w.])", text)}
    return sorted(strings) or ["x"], sorted(numbers) or [1]


def random_arguments(rng: random.Random, schema: dict[str, Any], strings: list[str], numbers: list[int]) -> dict:
    """Arguments that satisfy a tool's schema (required properties only), drawn from the candidates."""

    def value(s: dict[str, Any]) -> Any:
        if "enum" in s:
            return rng.choice(s["enum"])
        if "anyOf" in s:
            return value(s["anyOf"][0])
        kind = s.get("type")
        if kind == "integer":
            return rng.choice(numbers)
        if kind == "number":
            return float(rng.choice(numbers))
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "array":
            return [value(s.get("items", {"type": "string"}))]
        if kind == "object":
            return {}
        return rng.choice(strings)

    return {name: value(schema["properties"][name]) for name in schema.get("required", [])}


class RandomValidAgent:
    """The random-valid-call baseline: each turn, with probability `p_call`, one call to a random offered tool with
    schema-valid arguments; otherwise (and after `max_calls`) a closing message, which ends the dialogue."""

    def __init__(self, seed: int = 0, p_call: float = 0.8, max_calls: int = 8):
        self.rng = random.Random(seed)
        self.p_call, self.max_calls, self.calls = p_call, max_calls, 0

    def reply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        if not tools or self.calls >= self.max_calls or self.rng.random() >= self.p_call:
            return "Done: your request has been handled."
        self.calls += 1
        f = self.rng.choice(tools)["function"]
        strings, numbers = _candidates(messages)
        return tool_call_block(f["name"], random_arguments(self.rng, f["parameters"], strings, numbers))


def reply_text(message: dict[str, Any]) -> str:
    """An assistant message as the model writes it: its content, then one block per call."""
    calls = [c.get("function", c) for c in message.get("tool_calls") or []]
    return (message.get("content") or "") + "".join(tool_call_block(c["name"], c["arguments"]) for c in calls)


class ExpertAgent:
    """The ceiling: replays the expert solver's reference replies for `task`, in order (then says nothing)."""

    def __init__(self, task: Task):
        reference = ExpertSolver(task).run()
        self.replies = [reply_text(m) for m in reference if m["role"] == "assistant"]

    def reply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        return self.replies.pop(0) if self.replies else ""


def describe(message: dict[str, Any]) -> str:
    """One line per call of an assistant message, `name({"arg": ...})`, for terminal output."""
    calls = [c.get("function", c) for c in message.get("tool_calls") or []]
    return "\n".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in calls)


__all__ = [
    "ContextFull",
    "ExpertAgent",
    "ModelAgent",
    "RandomValidAgent",
    "describe",
    "generate_reply",
    "prompt_ids",
    "random_arguments",
    "reply_text",
    "sft_window",
]
