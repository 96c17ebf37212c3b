"""Tests of the agentic figures and dialogue views (`longcat_lab.viz.agentic`) on hand-made results.
Run: .venv/bin/python -m pytest tests/agent/test_agentic_figures.py"""

import pytest

from longcat_lab.eval.agentic import pass_table
from longcat_lab.synth.agents import AXES
from longcat_lab.viz.agentic import (
    axis_levels_figure,
    difficulty_figure,
    failure_figure,
    pair_grid,
    partial_credit_figure,
    pass_heatmap,
    special_tokens_html,
    transcript_html,
)


def _result():
    # Task "c{i}{t}{u}" passes its two trials when information + toolset + user <= 5, one of two when 6, else none.
    outcomes, cells = {}, {}
    for i in (1, 2, 3):
        for t in (1, 2, 3):
            for u in (1, 2, 3):
                s = i + t + u
                outcomes[f"c{i}{t}{u}"] = [s <= 6, s <= 5]
                cells[f"c{i}{t}{u}"] = f"{i}-{t}-{u}"
    table = pass_table(outcomes, cells, 2)
    agent = {"pass_hat": table, "categories": {"passed": 30, "turn limit": 20, "wrong end state": 4}}
    return {"agents": {"fine-tuned": agent, "expert": {**agent, "categories": {"passed": 54}}}}


def test_pair_grid_averages_over_the_third_axis():
    cells = _result()["agents"]["fine-tuned"]["pass_hat"]["cells"]
    grid = pair_grid(cells, 0, 1, k=1)  # information x toolset; pass^1 = 1 if s <= 5, 0.5 if s == 6
    # (1, 1): u = 1, 2, 3 -> s = 3, 4, 5 -> 1, 1, 1; (3, 3): s = 7, 8, 9 -> 0; (2, 2): s = 5, 6, 7 -> 1, .5, 0.
    assert grid[0][0] == 1 and grid[2][2] == 0 and grid[1][1] == pytest.approx(0.5)
    assert pair_grid(cells, 0, 1, k=2)[1][1] == pytest.approx(1 / 3)
    assert pair_grid({"1-1-1": [1.0]}, 0, 2)[2][2] is None


def test_figures():
    result = _result()
    fig = pass_heatmap(result, "fine-tuned", k=1)
    assert len(fig.data) == 3 and fig.data[0].z[0][0] == 1 and "pass^1" in fig.layout.title.text
    with pytest.raises(ValueError, match="agent='nobody'"):
        pass_heatmap(result, "nobody")
    with pytest.raises(ValueError, match="k=3"):
        pass_heatmap(result, "fine-tuned", k=3)
    lines = axis_levels_figure(result)  # information level 1: s = 3, 4, 5, 6, 7 for 1, 2, 3, 2, 1 tasks
    assert len(lines.data) == 6 and list(lines.data[0].y) == pytest.approx([7 / 9, 1 / 2, 2 / 9])
    summary = {"records": 9, "domains": {"bank": 9}, "levels": {a: {1: 2, 2: 3, 3: 4} for a in AXES}}
    levels = difficulty_figure(summary)
    assert [list(b.y) for b in levels.data] == [[2, 2, 2], [3, 3, 3], [4, 4, 4]]
    bars = failure_figure(result)
    assert [b.name for b in bars.data] == ["passed", "turn limit", "wrong end state"]
    assert list(bars.data[0].y) == [30, 54]


def test_partial_credit_bars_follow_the_steps_of_each_agent():
    credit = {"valid_calls": 0.9, "right_write_tool": 0.5, "right_write_arguments": 0.25, "right_end_state": 0.2}
    result = {"agents": {"fine-tuned": {"partial_credit": credit}, "fine-tuned (free)": {"partial_credit": {
        **credit, "valid_calls": 0.1}}, "expert": {"pass_hat": {}}}}  # fmt: skip
    fig = partial_credit_figure(result)
    assert [b.name for b in fig.data] == ["fine-tuned", "fine-tuned (free)"]  # an agent without credit is left out
    assert list(fig.data[0].y) == [0.9, 0.5, 0.25, 0.2] and fig.data[1].y[0] == 0.1
    assert fig.data[1].marker.pattern.shape == "/" and fig.data[0].marker.color == fig.data[1].marker.color


def test_dialogue_views_mark_special_tokens_calls_and_errors():
    page = special_tokens_html("[Round 0] USER:hi ASSISTANT:<longcat_tool_call>\n{}\n</longcat_tool_call></longcat_s>")
    assert page.count("<span") == 3 and "&lt;longcat_tool_call&gt;" in page
    messages = [
        {"role": "user", "content": "<b>hi</b>"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "Error: bad", "malformed": True},
    ]
    view = transcript_html(messages)
    assert "&lt;b&gt;hi" in view and "→ f({&quot;x&quot;: 1})" in view and "#fde8e8" in view
