"""Task synthesis: every reference dialogue passes its own verifier (hundreds here, thousands in the slow test), the
difficulty spans the three axes, the verifier fails dialogues that are wrong, the domains enforce their policies,
the user simulator withholds what it should, pass^k is τ²-bench's, records render in the chat format, and
`longcat-lab synth` writes the same file for the same seed.

Run: `bash tools/test.sh tests/synth/test_synth.py`.
"""

import copy
import json

import pytest

from longcat_lab.chat import parse_assistant, render
from longcat_lab.cli import main
from longcat_lab.synth import (
    AXES,
    STOP,
    BankEnv,
    ExpertSolver,
    TaskDesigner,
    UserSimulator,
    pass_hat_k,
    to_record,
    verify,
)
from longcat_lab.synth.dialogues import generate, summarize


def solved(n, seed):
    designer = TaskDesigner(seed)
    for i in range(n):
        task = designer.design(i)
        yield task, ExpertSolver(task).run()


def check_all_pass(n, seed):
    cells, failures = set(), []
    for task, messages in solved(n, seed):
        verdict = verify(task, messages)
        if not verdict.passed:
            failures.append((task.task_id, task.difficulty, verdict.reasons))
        cells.add((task.domain, *(task.difficulty[a] for a in AXES)))
    assert not failures, failures[:3]
    return cells


def test_reference_dialogues_pass_their_verifier():
    cells = check_all_pass(300, seed=1)
    assert {c[0] for c in cells} == {"bank", "shop"}
    for i in range(3):
        assert {c[i + 1] for c in cells} == {1, 2, 3}, AXES[i]


@pytest.mark.slow
def test_thousands_of_reference_dialogues_pass():
    cells = check_all_pass(3000, seed=2)
    assert len(cells) == 54  # both domains x 27 difficulty cells


def find(seed, **difficulty):
    for task, messages in solved(400, seed):
        if all(task.difficulty[k] == v for k, v in difficulty.items()):
            return task, messages
    raise AssertionError(difficulty)


def test_verifier_fails_wrong_dialogues():
    task, messages = find(3, toolset=2)
    assert verify(task, messages).passed
    last_call = max(i for i, m in enumerate(messages) if m.get("tool_calls"))
    no_write = messages[:last_call] + messages[last_call + 2 :]
    assert "end state differs" in " ".join(verify(task, no_write).reasons)
    silent = copy.deepcopy(messages)
    silent[-2]["content"] = "Done."
    assert "never told the user" in " ".join(verify(task, silent).reasons)
    forged = copy.deepcopy(messages)
    forged[last_call + 1]["content"] = '{"refund": 1}'
    assert "tool messages differ" in " ".join(verify(task, forged).reasons)
    assert "did not end" in " ".join(verify(task, messages[:-1]).reasons)


def test_user_simulator_reveals_only_when_asked():
    task, messages = find(4, user=3)
    user = UserSimulator(task)
    text, known = user.opening()
    identity = task.user["identity"]
    assert not set(identity) & set(known) and task.user["clarify_slot"] not in known
    assert all(str(v) not in text for v in identity.values())
    assert user.answer("identity")[1] == identity
    first = user.answer("confirm")[1]
    assert first == task.user["change"] and user.answer("confirm") == ("Yes, please go ahead.", {})
    assert STOP in user.stop() and STOP in messages[-1]["content"]


def test_policy_is_enforced_by_the_environment():
    designer = TaskDesigner(6, domains=("bank",))
    env = BankEnv(designer.design(0).initial_state)
    reg = env.registry()
    source = next(iter(env.state["accounts"]))
    owner = env.state["accounts"][source]["owner"]
    other = next(a for a in env.state["accounts"] if a != source)
    assert "not verified" in reg.call("transfer", {"from_account": source, "to_account": other, "amount": 10}).error
    assert not reg.call("verify_identity", {"customer_id": owner, "pin": "no"}).ok
    assert reg.call("verify_identity", {"customer_id": owner, "pin": env.state["customers"][owner]["pin"]}).ok
    before = env.state_hash()
    too_much = env.state["accounts"][source]["balance"] + 1
    assert not reg.call("transfer", {"from_account": source, "to_account": other, "amount": too_much}).ok
    assert env.state_hash() == before  # a refused write changes nothing
    assert json.loads(json.dumps(env.state)) == env.state  # plain data


def test_pass_hat_k():
    trials = {"a": [True, True, False, True], "b": [True, False, False, False]}
    assert pass_hat_k(trials, 1) == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert pass_hat_k(trials, 2) == pytest.approx((3 / 6 + 0) / 2)
    assert pass_hat_k(trials, 4) == 0.0
    for bad in (0, 5):
        with pytest.raises(ValueError, match="k="):
            pass_hat_k(trials, bad)


def test_records_render_and_parse_back():
    for task, messages in solved(40, seed=7):
        record = to_record(task, messages)
        assert set(record) == {"messages", "tools", "difficulty", "task_id"}
        text = render(record["messages"], tools=record["tools"], add_generation_prompt=False)
        assert text.count("</longcat_s>") == sum(m["role"] == "assistant" for m in messages)
        for reply in text.split(" ASSISTANT:")[1:]:
            parsed = parse_assistant(reply, tools=record["tools"])
            assert parsed.ok, parsed.errors
        calls = [c["function"] for m in messages for c in m.get("tool_calls") or []]
        parsed_calls = [c for r in text.split(" ASSISTANT:")[1:] for c in parse_assistant(r).tool_calls]
        assert parsed_calls == calls


def test_cli_writes_the_same_file_for_the_same_seed(tmp_path, capsys):
    for name in ("a", "b"):
        assert (
            main(["synth", "--n", "12", "--out", str(tmp_path / f"{name}.jsonl"), "--seed", "9", "--no-progress"]) == 0
        )
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(records) == 12 and summarize(records)["records"] == 12
    assert "12 verified dialogues" in capsys.readouterr().out
    assert main(["synth", "--n", "3", "--out", str(tmp_path / "c.jsonl"), "--domains", "moon"]) == 2
    assert [r["task_id"] for r in generate(3, seed=9)] == [r["task_id"] for r in records[:3]]
