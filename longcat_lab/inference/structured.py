"""Structured decoding of tool calls (docs/design.md §5.2): after the `<longcat_tool_call>` marker the model can only
write `{"name": <an offered tool>, "arguments": <that tool's JSON schema>}` and the closing marker, as serving
engines do with a grammar library; everywhere else its logits are untouched.

`llguidance` compiles the grammar (a JSON schema embedded in a small Lark rule) for our own byte-level BPE
`tokenizer.json` and, token by token, gives the set of tokens that keep the text a prefix of the grammar. A
`ToolCallDecoder` holds the tokenizer and one compiled grammar per set of offered tools; each sequence being decoded
gets its own `ToolCallConstraint` (`decoder.constraint(tools)`), which the decoding loop calls twice per token:
`mask(logits_V)` before sampling and `advance(token)` after (`inference.generate.stream`'s `constraints`). Every
call ends: the tools' schemas are `bounded` (strings, arrays and integers get a length where they have none), and
past `close_after` tokens a call under way takes the shortest way to its closing marker (`closing`).

Structured outputs (the server's `response_format` and `tool_choice`, docs/design.md §7.2) constrain a whole reply
instead: `decoder.reply_constraint(schema, tools)` gives a `ReplyConstraint` whose grammar holds from the first token,
a JSON value satisfying `schema` or a call to one of `tools`, then the end-of-turn token. `row_hook` turns either
kind of constraint into the batch decoder's per-row hook (`inference.batch.LogitsMask`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import numpy as np
import torch

from longcat_lab.chat.template import END_OF_TURN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# The JSON exactly as `chat.tool_call_block` renders it (json.dumps' separators, no other whitespace): the form the
# model was fine-tuned on, and no room for a model to spend its token budget on spaces.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Bounds that a call's values get where their tool's schema sets none, so that every constrained call ends within a
# known length: a degenerate model otherwise writes one string (or integer) for ever and is cut off by its token
# budget, which leaves a call that does not parse. The calculator's expression (at most 200 characters) is the
# longest value our tools take.
MAX_STRING = 256
MAX_ITEMS = 32
MAX_INTEGER = 10**15 - 1
# Keys whose value is one schema, a list of schemas, or a {name: schema} mapping.
_ONE = ("items", "additionalProperties", "not")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "$defs", "definitions")
# Compiled grammars kept per decoder (the least recently used goes first): a server's clients choose the schemas.
MAX_GRAMMARS = 64


def _allowed(matcher, vocab: int) -> torch.Tensor:
    """The tokens `matcher` allows next, as a bool tensor [vocab]."""
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(bits, count=vocab, bitorder="little").view(np.bool_))


def _functions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The function parts of OpenAI-style tool specs (or flat {name, parameters} dicts); ValueError for anything else
    and for a name offered twice."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ValueError(f"tools={tools!r} is not allowed: structured decoding needs a non-empty list of tool specs")
    out, seen = [], set()
    for i, t in enumerate(tools):
        f = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ValueError(f"tools[{i}]={t!r} is not allowed: it must be a tool spec with a string 'name'")
        if f["name"] in seen:
            raise ValueError(f"tools[{i}].name={f['name']!r} is not allowed: the name is offered twice")
        seen.add(f["name"])
        out.append(f)
    return out


def _names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [f["name"] for f in _functions(tools)]


def bounded(schema: Any) -> Any:
    """A copy of JSON schema `schema` in which every string, array and integer without a bound of its own gets one
    (at most MAX_STRING characters, MAX_ITEMS items, |value| <= MAX_INTEGER), nested schemas included."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = bounded(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [bounded(s) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: bounded(s) for name, s in out[key].items()}
    types = out.get("type")
    kinds = set(types) if isinstance(types, list) else {types}
    if "enum" in out or "const" in out:
        return out
    if "string" in kinds:
        out.setdefault("maxLength", MAX_STRING)
    if "array" in kinds:
        out.setdefault("maxItems", MAX_ITEMS)
    if "integer" in kinds:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -MAX_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = MAX_INTEGER
    return out


def call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call to one of `tools`: an object whose first key `name` is a tool's name and whose
    `arguments` satisfy that tool's `parameters` (default: any object), `bounded` so that the call ends."""
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": bounded(f.get("parameters") or {"type": "object"}),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in _functions(tools)
        ],
        "x-guidance": JSON_OPTIONS,
    }


class ToolCallConstraint:
    """The constraint on one sequence: free text until the open marker, then the call grammar until the closing
    marker, then free text again (a reply may hold several calls). `error` holds llguidance's message if a token
    outside the mask was ever advanced (the call is then left unconstrained, and the parser reports it)."""

    def __init__(self, grammar: _CallGrammar):
        self.grammar = grammar
        self.matcher = grammar.matcher
        self.in_call = False
        self.error: str | None = None
        # Tokens advanced so far, and the count past which a call under way closes the shortest way (`mask`); the
        # agent sets it to its reply's budget (`agent.generate_reply`), None never closes early.
        self.tokens = 0
        self.close_after: int | None = None
        self._in_string = self._escaped = False  # where the call's JSON text stands

    def allowed(self) -> torch.Tensor:
        """The tokens the grammar allows next, as a bool tensor [vocab] (all of them outside a call)."""
        if not self.in_call:
            return torch.ones(self.grammar.vocab_size, dtype=torch.bool)
        return _allowed(self.matcher, self.grammar.vocab_size)

    def mask(self, logits_V: torch.Tensor) -> torch.Tensor:
        """`logits_V` itself outside a call; inside one, a copy with -inf at every token the grammar forbids (past
        `close_after`, at every token but the `closing` one)."""
        if not self.in_call:
            return logits_V
        allowed = self.allowed()
        if self.close_after is not None and self.tokens >= self.close_after:
            allowed = self.closing(allowed)
        return torch.where(allowed.to(logits_V.device), logits_V, float("-inf"))

    def closing(self, allowed: torch.Tensor) -> torch.Tensor:
        """The shortest way out of a call: only the first closing token the grammar allows (inside a string its
        closing quote; outside one the closing marker, the newline before it, `}`, `]`, `,`, then `"`, which starts
        a required key or an empty string), or the grammar's own mask where none is allowed (a key's name, an enum,
        a digit). A call then ends in a few tokens: a string closes at once, each required key still missing gets
        the shortest value. `bounded` makes it end in any case."""
        for token in self.grammar.closers[self._in_string]:
            if allowed[token]:
                only = torch.zeros_like(allowed)
                only[token] = True
                return only
        return allowed

    def advance(self, token: int) -> None:
        """Move past the sampled `token`."""
        self.tokens += 1
        if not self.in_call:
            if token == self.grammar.open_id:
                # A fresh copy of the compiled matcher per call (microseconds): `reset` keeps an error state.
                self.matcher = self.grammar.matcher.deep_copy()
                self.in_call = True
                self._in_string = self._escaped = False
            return
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error()
            self.in_call = False
        elif self.matcher.is_stopped():
            self.in_call = False
        for ch in self.grammar.texts[token]:  # a quote not escaped opens or closes a JSON string
            if self._escaped:
                self._escaped = False
            elif ch == "\\" and self._in_string:
                self._escaped = True
            elif ch == '"':
                self._in_string = not self._in_string


class ReplyConstraint:
    """The constraint on a whole reply: from the first token to the end-of-turn token every token keeps the text a
    prefix of the grammar. `error` as in `ToolCallConstraint` (the rest of the reply is then unconstrained)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher.deep_copy(), vocab_size
        self.error: str | None = None

    def allowed(self) -> torch.Tensor:
        if self.error is not None or self.matcher.is_stopped():
            return torch.ones(self.vocab_size, dtype=torch.bool)
        return _allowed(self.matcher, self.vocab_size)

    def mask(self, logits_V: torch.Tensor) -> torch.Tensor:
        """A copy of `logits_V` with -inf at every token the grammar forbids."""
        if self.error is not None or self.matcher.is_stopped():
            return logits_V
        return torch.where(self.allowed().to(logits_V.device), logits_V, float("-inf"))

    def advance(self, token: int) -> None:
        if self.error is None and not self.matcher.is_stopped() and not self.matcher.consume_token(token):
            self.error = self.matcher.get_error()


def row_hook(constraint: ToolCallConstraint | ReplyConstraint) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """`constraint` as a per-row logits hook (`inference.batch.LogitsMask`): given the ids drawn so far and the
    row's logits, it advances past the ids it has not seen, then masks the row."""
    seen = 0

    def hook(tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        for token in tokens[seen:]:
            constraint.advance(token)
        seen = len(tokens)
        return constraint.mask(logits)

    return hook


class _CallGrammar:
    """The compiled call grammar for one set of tools: the open marker's newline, the call's JSON, a newline and the
    closing marker token (the layout `chat.tool_call_block` renders)."""

    def __init__(self, decoder: ToolCallDecoder, tools: Sequence[dict[str, Any]]):
        guidance, vocab_size, close_id = decoder.guidance, decoder.vocab_size, decoder.close_id
        self.vocab_size, self.open_id = vocab_size, decoder.open_id
        self.texts, self.closers = decoder.texts, decoder.closers
        lark = f'start: "\\n" call "\\n" <[{close_id}]>\ncall: %json {json.dumps(call_schema(tools))}\n'
        self.matcher = llguidance.LLMatcher(guidance, lark, log_level=0)
        if self.matcher.is_error():
            error = self.matcher.get_error().splitlines()[0]
            raise ValueError(f"tools={_names(tools)}: their schemas are not allowed for structured decoding: {error}")


class ToolCallDecoder:
    """Structured tool calls for one tokenizer: `constraint(tools)` gives a fresh per-sequence `ToolCallConstraint`
    for the offered tools; grammars are compiled once per distinct tool set. `vocab_size` is the model's (at least
    the tokenizer's)."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        ids = {m: tokenizer.token_to_id(m) for m in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, END_OF_TURN)}
        missing = [m for m, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer is not allowed: it lacks the chat marker(s) {missing} as single tokens")
        size = tokenizer.get_vocab_size()
        vocab_size = size if vocab_size is None else vocab_size
        if vocab_size < size:
            raise ValueError(f"vocab_size={vocab_size} is not allowed: the tokenizer has {size} tokens")
        self.vocab_size = vocab_size
        self.open_id, self.close_id = ids[TOOL_CALL_OPEN], ids[TOOL_CALL_CLOSE]
        self.end_id = ids[END_OF_TURN]
        self.guidance = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=self.end_id)
        # Each token's text, for where a call's JSON stands (ids past the tokenizer's are never allowed in a call).
        self.texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(size)] + [""] * (
            vocab_size - size
        )
        # The closing tokens by preference, inside a JSON string (True) and outside one (`ToolCallConstraint.closing`).
        ids = {ch: self.texts.index(ch) for ch in '"}],\n' if ch in self.texts}
        self.closers = {
            True: [ids[c] for c in '"' if c in ids],
            False: [self.close_id] + [ids[c] for c in '\n}],"' if c in ids],
        }
        self._grammars: OrderedDict[str, Any] = OrderedDict()

    def _compiled(self, key: str, build: Callable[[], Any]) -> Any:
        if key in self._grammars:
            self._grammars.move_to_end(key)
        else:
            self._grammars[key] = build()
            if len(self._grammars) > MAX_GRAMMARS:
                self._grammars.popitem(last=False)
        return self._grammars[key]

    def constraint(self, tools: Sequence[dict[str, Any]]) -> ToolCallConstraint:
        key = json.dumps(["call", tools], sort_keys=True, default=str)
        build = lambda: _CallGrammar(self, tools)  # noqa: E731
        return ToolCallConstraint(self._compiled(key, build))

    def reply_constraint(
        self, schema: dict[str, Any] | None = None, tools: Sequence[dict[str, Any]] | None = None
    ) -> ReplyConstraint:
        """A whole reply that is a JSON value satisfying `schema` or one call to one of `tools` (at least one of
        the two), then the end-of-turn token. ValueError naming `schema` or `tools` if it does not compile."""
        if schema is None and not tools:
            raise ValueError("reply_constraint needs a schema or tools")
        key = json.dumps(["reply", schema, tools], sort_keys=True, default=str)
        return ReplyConstraint(self._compiled(key, lambda: self._reply_matcher(schema, tools)), self.vocab_size)

    def _reply_matcher(self, schema, tools):
        bodies, rules = [], []
        if schema is not None:
            bodies.append("reply")
            rules.append(f"reply: %json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}")
        if tools:
            bodies.append(f'<[{self.open_id}]> "\\n" call "\\n" <[{self.close_id}]>')
            rules.append(f"call: %json {json.dumps(call_schema(tools))}")
        lark = f"start: ({' | '.join(bodies)}) <[{self.end_id}]>\n" + "\n".join(rules) + "\n"
        matcher = llguidance.LLMatcher(self.guidance, lark, log_level=0)
        if matcher.is_error():
            if schema is not None and tools:  # which part fails: the schema alone, or else the tools
                self._reply_matcher(schema, None)
                self._reply_matcher(None, tools)
            error = matcher.get_error().splitlines()[0]
            what = f"schema={json.dumps(schema)[:200]}" if schema is not None else f"tools={_names(tools)}"
            raise ValueError(f"{what} is not allowed for structured decoding: {error}")
        return matcher


__all__ = [
    "JSON_OPTIONS",
    "MAX_GRAMMARS",
    "ReplyConstraint",
    "ToolCallConstraint",
    "ToolCallDecoder",
    "bounded",
    "call_schema",
    "row_hook",
]
