"""Tests of `longcat-lab chat` (`longcat_lab.agent.chat`): one user message answered with tool calls that succeed,
fail validation and are malformed (a scripted reply function), the toolsets, and the command itself in a
subprocess fed from stdin. Run: .venv/bin/python -m pytest tests/agent/test_chat.py"""

import io
import os
import subprocess
import sys

import pytest

from longcat_lab.agent.chat import build_tools, respond
from longcat_lab.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_call_block


def test_respond_runs_calls_reports_tool_errors_and_stops_at_a_plain_reply():
    replies = iter(
        [
            tool_call_block("calculator", {"expression": "2 + 3"}),
            tool_call_block("calculator", {"expression": 7}) + f"{TOOL_CALL_OPEN}{{oops{TOOL_CALL_CLOSE}",
            "It is 5.",
            "never asked",
        ]
    )
    prompts = []

    def reply(prompt):
        prompts.append(prompt)
        return next(replies)

    registry, _, _ = build_tools(["calculator"])
    messages = [{"role": "user", "content": "What is 2+3?"}]
    out = io.StringIO()
    respond(reply, messages, registry, out)
    text = out.getvalue()
    assert "[tool] calculator -> 5\n" in text
    assert "[tool error] calculator: expression: 7 is not of type 'string'\n" in text
    assert "[tool error] tool call 2: invalid JSON" in text
    assert text.count("model> ") == 3 and len(prompts) == 3
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
    assert messages[-1] == {"role": "assistant", "content": "It is 5."}
    assert "<longcat_tool_response>\nError: tool call 2: invalid JSON" in prompts[2]  # the model read its error


def test_respond_hands_back_after_max_rounds():
    registry, _, _ = build_tools(["calculator"])
    out = io.StringIO()
    messages = [{"role": "user", "content": "loop"}]
    respond(lambda p: tool_call_block("calculator", {"expression": "1"}), messages, registry, out, max_rounds=2)
    assert "kept calling tools for 2 replies" in out.getvalue() and len(messages) == 5


def test_toolsets():
    registry, policy, notes = build_tools(["calculator", "bank", "shop"], env_seed=3)
    assert {"calculator", "transfer", "return_item"} <= set(registry.names)
    assert "bank's support agent" in policy and len(notes) == 2 and "PIN" in notes[0]
    assert build_tools([])[0].names == []
    with pytest.raises(ValueError, match="--tools='web'"):
        build_tools(["web"])


@pytest.mark.slow
def test_chat_command_reads_stdin_and_streams_replies(tmp_path):
    from longcat_lab import checkpoint
    from longcat_lab.data import DataConfig, load_tokenizer
    from longcat_lab.testing import random_model, tiny_train_config

    tok = load_tokenizer(512, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))
    checkpoint.save(tmp_path / "run", 0, random_model(seed=2), tok, tiny_train_config("").to_dict(), {})
    cmd = [sys.executable, "-m", "longcat_lab.cli", "chat", "--ckpt", str(tmp_path / "run"), "--tools", "calculator"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        cmd + ["--max-new-tokens", "6"], input="hello\n/reset\nagain\n", capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "tools: calculator" in run.stdout and "conversation cleared" in run.stdout
    assert run.stdout.count("model> ") >= 2 and run.stdout.count("you> ") == 4  # three lines, then end of input


def test_chat_command_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    from longcat_lab.cli import main

    assert main(["chat", "--ckpt", str(tmp_path), "--tools", "web"]) == 2
    assert capsys.readouterr().err.strip() == (
        "longcat-lab chat: error: --tools='web' is not allowed: choose from calculator, bank, shop"
    )
    assert main(["chat", "--ckpt", str(tmp_path)]) == 2
    assert "neither a checkpoint folder nor a run folder" in capsys.readouterr().err
