"""What every synthesis domain shares (docs/design.md §5.3): an `Environment` whose database is plain data (so an end
state hashes), whose tools are its documented methods, and whose policy is written text; the `Task` record the
task designer composes; and the user simulator's stop marker.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from longcat_lab.tools import Registry, Tool, ToolError

STOP = "###STOP###"  # the user simulator ends a dialogue with this, as τ²-bench's does


class Environment:
    """A domain's database and its tools. Subclasses set `domain`, `policy` and the tool names by kind; tools are
    methods with type hints and docstrings, and the ones that need an identity check call `require_verified`."""

    domain: ClassVar[str] = ""
    policy: ClassVar[str] = ""
    read_tools: ClassVar[tuple[str, ...]] = ()
    write_tools: ClassVar[tuple[str, ...]] = ()
    distractor_tools: ClassVar[tuple[str, ...]] = ()
    _tool_cache: ClassVar[dict[str, Tool]]

    def __init__(self, state: dict[str, Any]):
        self.state = copy.deepcopy(state)
        self.verified: set[str] = set()  # the session's verified customers; not part of the database

    @classmethod
    def tool_names(cls) -> tuple[str, ...]:
        return cls.read_tools + cls.write_tools + cls.distractor_tools

    def tools(self, names: tuple[str, ...] | list[str] | None = None) -> list[Tool]:
        """This environment's tools (all, or `names`), bound to it; schemas are derived once per class."""
        cls = type(self)
        if "_tool_cache" not in cls.__dict__:
            cls._tool_cache = {n: Tool.from_function(getattr(self, n)) for n in cls.tool_names()}
        return [dataclasses.replace(cls._tool_cache[n], function=getattr(self, n)) for n in names or cls.tool_names()]

    def registry(self, names=None, timeout_s: float | None = 2.0) -> Registry:
        return Registry(self.tools(names), timeout_s=timeout_s)

    def state_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.state, sort_keys=True).encode()).hexdigest()

    def require_verified(self, customer_id: str) -> None:
        if customer_id not in self.verified:
            raise ToolError(f"customer {customer_id} is not verified; the policy requires verification first")

    def record(self, table: str, key: str) -> dict[str, Any]:
        row = self.state[table].get(key)
        if row is None:
            raise ToolError(f"no {table[:-1]} with id {key!r}")
        return row


@dataclass
class Task:
    """One synthesised task, τ²-bench style: a user scenario, the initial database, the tools offered, and the
    evaluation criteria (reference actions whose replay gives the target end state, and facts to tell the user)."""

    task_id: str
    domain: str
    difficulty: dict[str, int]  # {"information", "toolset", "user"}, each 1..3
    initial_state: dict[str, Any]
    tools: list[str]  # names offered to the agent, distractors included
    intent: dict[str, Any]  # what the user wants, as the user simulator knows it
    user: dict[str, Any]  # the simulator's scenario: identity, what it withholds, its change of mind
    actions: list[dict[str, Any]]  # reference calls {"name", "arguments"}, replayed by the verifier
    communicate_info: list[str]  # substrings the agent must say to the user

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
