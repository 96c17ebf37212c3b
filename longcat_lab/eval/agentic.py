"""The agentic evaluation (docs/design.md §5.5), what `longcat-lab eval --agentic` runs.

- `heldout_tasks(per_cell)`: tasks from a designer seed that no fine-tuning dialogue comes from, `per_cell` in
  each of the 27 difficulty cells, with ids `{domain}-9xxxxx` that `longcat-lab synth` never writes for fewer than
  900000 records; `check_heldout` refuses tasks that share an id or a reference dialogue with fine-tuning records.
- `evaluate_agents(agents, tasks, k)`: every agent plays every task k times (`agent.play`); per agent, pass^1..k
  overall, per cell and per level of each axis (`pass_table`), the stop reasons, and what `eval.episodes` reads off
  each episode (its failure category, the errors it got back, partial credit), with a few transcripts.
- `evaluate_agentic_checkpoint(ckpt, base=...)`: the fine-tuned model, the pre-trained model, the
  random-valid-call baseline and the expert (the ceiling) on the same tasks, plus arithmetic exact match of each
  model with and without the calculator; written as `agentic.json` in the checkpoint folder. The models' tool
  calls are decoded under the tools' schemas (`structured="on"`, docs/design.md §5.2), freely ("off"), or both
  ways side by side ("both": the free agents are named `... (free)`, their arithmetic is `arithmetic_free`).
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from longcat_lab import checkpoint
from longcat_lab._util import atomic_write_bytes, check_choice, check_int, check_nonnegative, json_bytes, provenance
from longcat_lab.agent.arithmetic import arithmetic_exact_match
from longcat_lab.agent.loop import DEFAULT_MAX_TURNS, Agent, Episode, cell_name, play
from longcat_lab.agent.policies import ExpertAgent, ModelAgent, RandomValidAgent, sft_window
from longcat_lab.data.sft import load_records
from longcat_lab.eval.copying import copy_score, format_copying
from longcat_lab.eval.episodes import CATEGORIES, error_kinds, failure_category, partial_credit
from longcat_lab.eval.recipe import sft_recipe
from longcat_lab.eval.suite import one_thread
from longcat_lab.inference.structured import ToolCallDecoder
from longcat_lab.synth.agents import AXES, LEVELS, ExpertSolver, TaskDesigner, pass_hat_k
from longcat_lab.synth.env import Task

AGENTIC_FILE = "agentic.json"
HELDOUT_SEED = 1  # the designer seed of evaluation tasks; `longcat-lab synth` defaults to seed 0
HELDOUT_OFFSET = 900_000  # evaluation task ids start here, so they never equal a fine-tuning record's id
CELLS = [f"{i}-{t}-{u}" for i in LEVELS for t in LEVELS for u in LEVELS]
AGENT_ORDER = ("fine-tuned", "pre-trained", "random-valid", "expert")  # how tables list them (JSON sorts keys)
STRUCTURED = ("on", "off", "both")
FREE = " (free)"  # the suffix of a model agent that decodes its calls unconstrained when both ways are evaluated
AgentFactory = Callable[[Task, int], Agent]  # (task, trial) -> a fresh agent


def check_cells(cells) -> list[str]:
    """`cells` as a list of difficulty cells "i-t-u" (each level 1 to 3), None for all 27; ValueError otherwise."""
    if cells is None:
        return list(CELLS)
    if isinstance(cells, str) or not cells or any(c not in CELLS for c in cells):
        raise ValueError(f"cells={cells!r} is not allowed: give difficulty cells such as 1-1-1 (levels 1 to 3)")
    return list(dict.fromkeys(cells))


def heldout_tasks(per_cell: int, seed: int = HELDOUT_SEED, cells: list[str] | None = None) -> list[Task]:
    """`per_cell` tasks in each difficulty cell of `cells` (default: all 27), in the designer's order."""
    check_int("per_cell", per_cell)
    designer, need, out, i = TaskDesigner(seed), dict.fromkeys(check_cells(cells), per_cell), [], 0
    while any(need.values()):
        task = designer.design(HELDOUT_OFFSET + i)
        i += 1
        if need.get(cell_name(task.difficulty)):
            need[cell_name(task.difficulty)] -= 1
            out.append(task)
    return out


def _fingerprint(messages: list[dict[str, Any]]) -> str:
    """What the user and the tools say in a dialogue: equal for the same task solved the same way."""
    return json.dumps([(m.get("role"), m.get("content")) for m in messages if m.get("role") in ("user", "tool")])


def check_heldout(tasks: list[Task], records: list[dict[str, Any]]) -> None:
    """ValueError when an evaluation task shares its id with a fine-tuning record, or its reference dialogue's user
    and tool messages (so its database and scenario) with one."""
    ids = {r.get("task_id") for r in records}
    prints = {_fingerprint(r.get("messages") or []) for r in records}
    same = [t.task_id for t in tasks if t.task_id in ids or _fingerprint(ExpertSolver(t).run()) in prints]
    if same:
        raise ValueError(f"evaluation tasks {same[:5]} also appear in the fine-tuning data: choose another --seed")


def pass_table(outcomes: dict[str, list[bool]], cells: dict[str, str], k: int) -> dict[str, Any]:
    """pass^1..k (τ²-bench, `synth.pass_hat_k`) from per-task trial outcomes: overall, per difficulty cell (keys of
    `cells` are task ids, values "i-t-u") and per level of each axis (tasks of every cell at that level)."""
    check_int("k", k)

    def curve(task_ids: list[str]) -> list[float] | None:
        sub = {t: outcomes[t] for t in task_ids}
        return [pass_hat_k(sub, j) for j in range(1, k + 1)] if sub else None

    by_cell = {c: [t for t in outcomes if cells[t] == c] for c in CELLS}
    axes = {
        axis: {str(lvl): curve([t for t in outcomes if cells[t].split("-")[a] == str(lvl)]) for lvl in LEVELS}
        for a, axis in enumerate(AXES)
    }
    return {
        "overall": curve(list(outcomes)),
        "cells": {c: curve(ts) for c, ts in by_cell.items() if ts},
        "axes": axes,
    }


def evaluate_agents(
    agents: dict[str, tuple[AgentFactory, bool]],
    tasks: list[Task],
    k: int,
    max_turns: int = DEFAULT_MAX_TURNS,
    transcripts: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Each agent ((factory, deterministic)) plays each task k times; a deterministic agent plays once and its
    episode counts for every trial. Returns per agent the pass tables, stop reasons, categories and transcripts."""
    check_int("k", k)
    cells = {t.task_id: cell_name(t.difficulty) for t in tasks}
    out: dict[str, Any] = {}
    for name, (factory, deterministic) in agents.items():
        t0 = time.perf_counter()
        outcomes: dict[str, list[bool]] = {}
        episodes: list[Episode] = []
        credit: list[dict[str, float]] = []
        for task in tqdm(tasks, desc=name, disable=not progress, dynamic_ncols=True):
            played = [play(factory(task, trial), task, max_turns) for trial in range(1 if deterministic else k)]
            outcomes[task.task_id] = [e.passed for e in played] * (k if deterministic else 1)
            episodes += played
            credit += [partial_credit(task, e) for e in played]
        failed = [e for e in episodes if not e.passed]
        out[name] = {
            "pass_hat": pass_table(outcomes, cells, k),
            "episodes": len(episodes),
            "stop_reasons": dict(Counter(e.stop_reason for e in episodes)),
            "categories": {c: n for c in CATEGORIES if (n := sum(failure_category(e) == c for e in episodes))},
            "mean_turns": sum(e.turns for e in episodes) / len(episodes),
            "malformed_per_episode": sum(e.malformed for e in episodes) / len(episodes),
            "error_kinds": dict(sum((error_kinds(e) for e in episodes), Counter()).most_common()),
            "partial_credit": {key: sum(c[key] for c in credit) / len(credit) for key in credit[0]},
            "transcripts": [e.to_dict() for e in ([e for e in episodes if e.passed][:1] + failed[: transcripts - 1])],
            "seconds": time.perf_counter() - t0,
        }
    return out


def model_factory(model, tokenizer, structured: bool = True, **generation) -> AgentFactory:
    """Agents for `model`, trial t sampling with seed t; with `structured`, all share one `ToolCallDecoder`."""
    decoder = ToolCallDecoder(tokenizer, model.config.vocab_size) if structured else False
    return lambda task, trial: ModelAgent(model, tokenizer, seed=trial, structured=decoder, **generation)


def baseline_agents() -> dict[str, tuple[AgentFactory, bool]]:
    """The random-valid-call floor (seeded by task and trial) and the expert ceiling."""
    return {
        "random-valid": (
            lambda task, trial: RandomValidAgent(seed=zlib.crc32(f"{task.task_id}/{trial}".encode())),
            False,
        ),
        "expert": (lambda task, trial: ExpertAgent(task), True),
    }


def source_of(ckpt: Path) -> Path | None:
    """The checkpoint a fine-tuned checkpoint started from (`init_from` in its train_config.json), if it exists."""
    try:
        source = json.loads((Path(ckpt) / "train_config.json").read_text()).get("init_from")
    except (OSError, ValueError):
        return None
    return Path(source) if source and Path(source).exists() else None


def evaluate_agentic_checkpoint(
    ckpt,
    base=None,
    per_cell: int = 1,
    k: int = 2,
    temperature: float = 0.5,
    max_new_tokens: int = 96,
    max_turns: int = DEFAULT_MAX_TURNS,
    arithmetic_n: int = 16,
    sft_data=None,
    seed: int = HELDOUT_SEED,
    write: bool = True,
    progress: bool = True,
    structured: str = "on",
    cells: list[str] | None = None,
) -> tuple[dict[str, Any], Path | None]:
    """(result, path of agentic.json or None): module docstring. `base` is the pre-trained checkpoint (default: the
    one `ckpt` was fine-tuned from, when it still exists); `sft_data` (a JSONL file) is checked for overlap with the
    evaluation tasks."""
    check_int("per_cell", per_cell)
    check_int("k", k)
    check_nonnegative("temperature", temperature)
    check_choice("structured", structured, STRUCTURED)
    ways = {"on": {"": True}, "off": {"": False}, "both": {"": True, FREE: False}}[structured]
    tasks = heldout_tasks(per_cell, seed, cells)
    if sft_data is not None:
        check_heldout(tasks, load_records(sft_data))
    models = {"fine-tuned": checkpoint.resolve(ckpt)}
    base = base if base is not None else source_of(models["fine-tuned"])
    if base is not None:
        models["pre-trained"] = checkpoint.resolve(base)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "tasks": len(tasks),
        "per_cell": per_cell,
        "cells": check_cells(cells),
        "k": k,
        "seed": seed,
        "models": {},
    }
    agents = {}
    with one_thread():
        for name, path in models.items():
            model, tokenizer, meta = checkpoint.load(path)
            options = {"max_new_tokens": max_new_tokens, "window": sft_window(path)}
            for suffix, constrained in ways.items():
                factory = model_factory(model, tokenizer, constrained, temperature=temperature, **options)
                agents[name + suffix] = (factory, temperature == 0)
            result["models"][name] = {
                "checkpoint": str(path),
                "step": meta.get("step"),
                "window": options["window"],
                "copying": copy_score(model),  # the skill an agent's arguments need (eval.copying)
            }
            for suffix, constrained in ways.items():
                key = "arithmetic" + ("_free" if suffix else "")
                result["models"][name][key] = arithmetic_exact_match(
                    model, tokenizer, arithmetic_n, structured=constrained, **options
                )
        agents |= baseline_agents()
        result["agents"] = evaluate_agents(agents, tasks, k, max_turns, progress=progress)
    result["seconds"] = time.perf_counter() - t0
    result["recipe"] = sft_recipe(models["fine-tuned"])
    result["command"] = (
        f"longcat-lab eval --agentic --ckpt {ckpt} --per-cell {per_cell} --k {k} --temperature {temperature:g} "
        f"--max-new-tokens {max_new_tokens} --max-turns {max_turns} --arithmetic {arithmetic_n} --seed {seed} "
        f"--structured {structured}" + (f" --cells {' '.join(cells)}" if cells else "")
    )
    result.update(provenance())
    result["generation"] = {
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "max_turns": max_turns,
        "structured": structured,
    }
    out = None
    if write:
        out = Path(models["fine-tuned"]) / AGENTIC_FILE
        atomic_write_bytes(out, json_bytes(result))
    return result, out


def _p(curve: list[float] | None, j: int = 0) -> str:
    return "   -" if not curve else f"{curve[j]:.2f}"


def format_agentic(result: dict[str, Any]) -> str:
    """The table: pass^1..k overall and pass^1 per level of each axis for every agent, the outcome categories, then
    arithmetic with and without the calculator."""
    k = result["k"]
    lines = [f"pass^k on {result['tasks']} held-out tasks ({result['per_cell']} per difficulty cell, k={k}):"]
    overall = "  ".join(f"p^{j:<2d}" for j in range(1, k + 1))
    lines.append(f"  {'agent':13s} {overall}  | " + " | ".join(f"{a} 1 / 2 / 3 (p^1)" for a in AXES))

    def order(item: tuple[str, Any]) -> tuple[int, str]:
        base = item[0].removesuffix(FREE)
        return (AGENT_ORDER.index(base) if base in AGENT_ORDER else 9, item[0])

    agents = sorted(result["agents"].items(), key=order)
    for name, a in agents:
        curve = a["pass_hat"]["overall"]
        row = "  ".join(_p(curve, j) for j in range(k))
        axes = " | ".join(
            " / ".join(_p(a["pass_hat"]["axes"][ax][str(lvl)]) for lvl in LEVELS).ljust(len(ax) + 16) for ax in AXES
        )
        lines.append(f"  {name:13s} {row}  | {axes}".rstrip())
    cells = result.get("cells") or CELLS
    if len(cells) <= 9:  # a chosen few: pass^1 of each, the figure a recipe's goal names
        lines.append("  pass^1 per cell (information-toolset-user): " + "  ".join(cells))
        for name, a in agents:
            lines.append(f"  {name:13s} " + "  ".join(_p(a["pass_hat"]["cells"].get(c)).rjust(len(c)) for c in cells))
    for name, a in agents:
        cats = ", ".join(f"{c} {n}" for c, n in a["categories"].items())
        lines.append(f"  {name}: {a['episodes']} episodes, {a['mean_turns']:.1f} turns each; {cats}")
        if "partial_credit" in a:
            pc = a["partial_credit"]
            lines.append(
                f"    valid calls {pc['valid_calls']:.2f}, first write: right tool {pc['right_write_tool']:.2f}, "
                f"right arguments {pc['right_write_arguments']:.2f}; right end state {pc['right_end_state']:.2f}"
            )
    for name, m in result.get("models", {}).items():
        if m.get("copying"):
            lines.append(f"{name}: {format_copying(m['copying'])}")
        for key in ("arithmetic", "arithmetic_free"):
            ar = m.get(key)
            if ar:
                w, c = ar["without_calculator"], ar["with_calculator"]
                lines.append(
                    f"arithmetic exact match, {name}{FREE if key.endswith('free') else ''}: without calculator "
                    f"{w['exact']}/{w['problems']}, with calculator {c['exact']}/{c['problems']} ({c['tool_calls']} "
                    "calls)"
                )
    return "\n".join(lines)


__all__ = [
    "AGENTIC_FILE",
    "CELLS",
    "HELDOUT_OFFSET",
    "HELDOUT_SEED",
    "STRUCTURED",
    "baseline_agents",
    "check_cells",
    "check_heldout",
    "evaluate_agentic_checkpoint",
    "evaluate_agents",
    "format_agentic",
    "heldout_tasks",
    "model_factory",
    "pass_table",
    "source_of",
]
