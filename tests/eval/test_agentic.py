"""Tests of `longcat-lab eval --agentic` (`longcat_lab.eval.agentic`): pass^k tables on hand-made outcomes, the
failure categories, partial credit, the held-out task set, the baselines' floor and ceiling, arithmetic with and
without the calculator, and the command on a random tiny checkpoint (with and without structured calls).
Run: .venv/bin/python -m pytest tests/eval/test_agentic.py"""

import json

import pytest

from longcat_lab.agent import Episode, cell_name
from longcat_lab.agent.arithmetic import answer_of, calculator_records, problems
from longcat_lab.cli import main
from longcat_lab.eval.agentic import (
    CELLS,
    HELDOUT_OFFSET,
    baseline_agents,
    check_heldout,
    evaluate_agents,
    format_agentic,
    heldout_tasks,
    pass_table,
)
from longcat_lab.eval.episodes import error_kinds, failure_category, partial_credit
from longcat_lab.synth import ExpertSolver
from longcat_lab.synth.dialogues import generate
from longcat_lab.tools import calculate


def test_pass_table_on_hand_made_outcomes():
    outcomes = {"a": [True, True, False], "b": [False, False, False], "c": [True, True, True]}
    cells = {"a": "1-1-1", "b": "1-1-1", "c": "3-2-1"}
    t = pass_table(outcomes, cells, 3)
    # pass^k per task = C(s, k) / C(3, k): a (2 of 3) -> 2/3, 1/3, 0; b -> 0; c -> 1, 1, 1.
    assert t["overall"] == pytest.approx([(2 / 3 + 0 + 1) / 3, (1 / 3 + 1) / 3, 1 / 3])
    assert t["cells"]["1-1-1"] == pytest.approx([1 / 3, 1 / 6, 0])
    assert t["cells"]["3-2-1"] == [1, 1, 1] and set(t["cells"]) == {"1-1-1", "3-2-1"}
    assert t["axes"]["information"]["1"] == pytest.approx([1 / 3, 1 / 6, 0])
    assert t["axes"]["information"]["2"] is None
    assert t["axes"]["user"]["1"] == t["overall"]
    with pytest.raises(ValueError, match="k=4"):
        pass_table(outcomes, cells, 4)


def _episode(**changes):
    base = dict(
        task_id="t",
        difficulty={"information": 1, "toolset": 1, "user": 1},
        messages=[],
        stop_reason="user_stop",
        turns=3,
        tool_calls=2,
        tool_errors=0,
        malformed=0,
        passed=False,
        reasons=["end state differs from the reference actions' end state"],
    )
    return Episode(**{**base, **changes})


@pytest.mark.parametrize(
    "changes, category",
    [
        ({"passed": True, "reasons": []}, "passed"),
        ({"stop_reason": "turn_limit"}, "turn limit"),
        ({"stop_reason": "context_full"}, "context full"),
        ({"tool_calls": 0}, "never called a tool"),
        ({"tool_calls": 0, "malformed": 2}, "only malformed calls"),
        ({"tool_errors": 1}, "calls refused"),
        ({}, "wrong end state"),
        ({"reasons": ["never told the user 'x'"]}, "facts not told"),
    ],
)
def test_failure_categories(changes, category):
    assert failure_category(_episode(**changes)) == category


def test_heldout_tasks_fill_every_cell_and_never_meet_the_fine_tuning_data():
    tasks = heldout_tasks(2)
    assert len(tasks) == 54
    assert sorted(
        f"{t.difficulty['information']}-{t.difficulty['toolset']}-{t.difficulty['user']}" for t in tasks
    ) == sorted(CELLS * 2)
    assert all(int(t.task_id.split("-")[1]) >= HELDOUT_OFFSET for t in tasks)
    records = list(generate(200, seed=0))
    check_heldout(tasks, records)  # designer seed 0 (the fine-tuning data) shares nothing with the evaluation
    with pytest.raises(ValueError, match="also appear in the fine-tuning data"):
        check_heldout(tasks, records + [{"task_id": tasks[3].task_id, "messages": []}])
    copy = {"task_id": "bank-000001", "messages": ExpertSolver(tasks[5]).run()}  # same task under another id
    with pytest.raises(ValueError, match=tasks[5].task_id):
        check_heldout(tasks, records + [copy])


def test_heldout_tasks_of_chosen_cells_are_those_of_the_full_set():
    chosen = heldout_tasks(3, cells=["3-1-1", "1-1-1"])
    assert sorted(cell_name(t.difficulty) for t in chosen) == ["1-1-1"] * 3 + ["3-1-1"] * 3
    everything = {t.task_id for t in heldout_tasks(3)}
    assert {t.task_id for t in chosen} <= everything  # the same tasks as in a full evaluation, not others
    for bad in (["1-1-4"], [], "1-1-1", ["1-1"]):
        with pytest.raises(ValueError, match="cells=.* is not allowed: give difficulty cells such as 1-1-1"):
            heldout_tasks(1, cells=bad)


def test_baselines_are_the_floor_and_the_ceiling():
    tasks = heldout_tasks(1)
    out = evaluate_agents(baseline_agents(), tasks, k=2)
    assert out["expert"]["pass_hat"]["overall"] == [1.0, 1.0] and out["expert"]["episodes"] == 27
    assert out["random-valid"]["pass_hat"]["overall"] == [0.0, 0.0] and out["random-valid"]["episodes"] == 54
    assert sum(out["random-valid"]["categories"].values()) == 54
    result = {"tasks": 27, "per_cell": 1, "k": 2, "agents": out}
    assert "expert" in format_agentic(result) and "1.00  1.00" in format_agentic(result)
    assert out["expert"]["partial_credit"] == {
        "valid_calls": 1.0,
        "right_write_tool": 1.0,
        "right_write_arguments": 1.0,
        "right_end_state": 1.0,
        "turns": out["expert"]["mean_turns"],
    }
    assert out["random-valid"]["partial_credit"]["valid_calls"] > 0.5  # its calls are well-formed when it calls
    assert "right end state 1.00" in format_agentic(result)


def test_partial_credit_reads_how_far_an_episode_got():
    task = heldout_tasks(1)[0]
    reference = ExpertSolver(task).run()
    write = next(
        c["function"]
        for m in reference
        for c in m.get("tool_calls") or []
        if c["function"]["name"] in ("set_daily_limit", "transfer", "return_item", "cancel_order")
    )
    wrong_args = {**write, "arguments": {**write["arguments"], "zzz": 1}}
    said = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": wrong_args}]}]
    credit = partial_credit(task, _episode(messages=said, tool_calls=1, malformed=3, turns=5))
    assert credit == {
        "valid_calls": 0.25,
        "right_write_tool": 1.0,
        "right_write_arguments": 0.0,
        "right_end_state": 0.0,
        "turns": 5.0,
    }
    nothing = partial_credit(task, _episode(tool_calls=0, reasons=[]))
    assert nothing["valid_calls"] == 0.0 and nothing["right_write_tool"] == 0.0 and nothing["right_end_state"] == 1.0


def test_arithmetic_problems_and_records():
    for p in problems(300):
        assert str(calculate(p["expression"])) == p["answer"] == answer_of(p["solution"])
    steps, calc = calculator_records(1)[:2]
    assert steps["tools"] == [] and steps["messages"][1]["content"].endswith("Answer: " + problems(1, 101)[0]["answer"])
    assert calc["messages"][1]["tool_calls"][0]["function"]["name"] == "calculator"
    assert (
        calc["messages"][3]["content"] == calc["messages"][1]["content"] + "Answer: " + calc["messages"][2]["content"]
    )
    assert answer_of("Answer: 3\nAnswer: -12") == "-12" and answer_of("no answer") is None
    assert {p["question"] for p in problems(50, 101)}.isdisjoint(p["question"] for p in problems(50))


@pytest.mark.slow
def test_eval_agentic_command_on_a_random_checkpoint(tmp_path, one_thread, capsys):
    from longcat_lab import checkpoint
    from longcat_lab.data import DataConfig, load_tokenizer
    from longcat_lab.testing import random_model, tiny_train_config

    tok = load_tokenizer(512, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))
    ckpt = checkpoint.save(tmp_path / "run", 0, random_model(seed=2), tok, tiny_train_config("").to_dict(), {})
    argv = ["eval", "--agentic", "--ckpt", str(tmp_path / "run"), "--base", str(ckpt), "--k", "2"]
    argv += ["--arithmetic", "1", "--max-turns", "2", "--max-new-tokens", "8", "--no-progress", "--structured", "both"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pass^k on 27 held-out tasks" in out and "arithmetic exact match, pre-trained" in out
    result = json.loads((ckpt / "agentic.json").read_text())
    assert set(result["agents"]) == {"fine-tuned", "pre-trained", "random-valid", "expert"} | {
        "fine-tuned (free)",
        "pre-trained (free)",
    }
    assert out.index("fine-tuned (free)") < out.index("pre-trained ")  # each free agent follows its constrained one
    assert result["agents"]["expert"]["stop_reasons"] == {"turn_limit": 27}  # the same 2-turn limit for every agent
    assert result["models"]["fine-tuned"]["window"] == 64  # the tiny preset's last training stage
    assert {"arithmetic", "arithmetic_free"} <= set(result["models"]["pre-trained"])
    assert "arithmetic exact match, pre-trained (free)" in out
    assert main(["eval", "--agentic", "--ckpt", str(ckpt), "--k", "0"]) == 2
    assert "--k=0" in capsys.readouterr().err


def test_error_kinds_read_off_a_transcript():
    messages = [
        {"role": "tool", "content": "Error: tool call 1: invalid JSON (Expecting value): '{'", "malformed": True},
        {"role": "tool", "content": "Error: tool call 1: unknown tool 'x'; known: ['a']", "malformed": True},
        {"role": "tool", "content": "Error: transfer: amount: 'lots' is not of type 'integer'"},
        {"role": "tool", "content": "Error: get_account: customer C1 is not verified; the policy requires it"},
        {"role": "tool", "content": "Error: find_customer: no customer named 'Bo'"},
        {"role": "tool", "content": "Error: set_daily_limit: limit=9000 is outside 1..5000"},
        {"role": "tool", "content": '{"ok": "no error here"}'},
        {"role": "user", "content": "Error: not a tool message"},
    ]
    assert error_kinds(_episode(messages=messages)) == {
        "malformed: invalid JSON": 1,
        "malformed: unknown tool": 1,
        "refused: schema": 1,
        "refused: identity not verified": 1,
        "refused: no such record": 1,
        "refused: outside the policy's limits": 1,
    }
