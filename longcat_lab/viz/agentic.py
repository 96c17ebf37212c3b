"""Figures of the agentic evaluation (docs/design.md §5.5), from the result of `eval.agentic.evaluate_agents` (or
`agentic.json`): the pass^k heat maps over each pair of difficulty axes, pass^1 by level of each axis for every
agent, the failures by category; and HTML views of a dialogue: the prompt string with its special tokens marked,
and a transcript with tool calls, results and errors highlighted."""

from __future__ import annotations

import html
import json
from itertools import combinations
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from longcat_lab.chat import SPECIAL_TOKENS
from longcat_lab.synth.agents import AXES, LEVELS

AGENT_COLOURS = {"fine-tuned": "#f58518", "pre-trained": "#4c78a8", "random-valid": "#bab0ac", "expert": "#54a24b"}
CATEGORY_COLOURS = {
    "passed": "#54a24b",
    "context full": "#9d755d",
    "turn limit": "#b279a2",
    "never called a tool": "#bab0ac",
    "only malformed calls": "#e45756",
    "calls refused": "#ff9da6",
    "wrong end state": "#f58518",
    "facts not told": "#72b7b2",
}


def _agent(result: dict[str, Any], agent: str) -> dict[str, Any]:
    agents = result.get("agents", result)
    if agent not in agents:
        raise ValueError(f"agent={agent!r} is not allowed: this result has {sorted(agents)}")
    return agents[agent]


def pair_grid(cells: dict[str, list[float]], a: int, b: int, k: int = 1) -> list[list[float | None]]:
    """Mean pass^k over the cells at each (level of axis a, level of axis b), rows = levels of a; None where no
    cell was measured."""
    grid = []
    for la in LEVELS:
        row = []
        for lb in LEVELS:
            vals = [
                c[k - 1] for name, c in cells.items() if int(name.split("-")[a]) == la and int(name.split("-")[b]) == lb
            ]
            row.append(sum(vals) / len(vals) if vals else None)
        grid.append(row)
    return grid


def difficulty_figure(summary: dict[str, Any]) -> go.Figure:
    """Dialogues per level of each difficulty axis (grouped bars), from `synth.summarize`."""
    fig = go.Figure()
    for lvl, colour in zip(LEVELS, ("#c6dbef", "#6baed6", "#08519c"), strict=True):
        ys = [summary["levels"][axis][lvl] for axis in AXES]
        fig.add_trace(go.Bar(x=list(AXES), y=ys, name=f"level {lvl}", marker_color=colour))
    fig.update_layout(
        title=f"{summary['records']} synthesised dialogues by difficulty level (domains {summary['domains']})",
        barmode="group",
        yaxis_title="dialogues",
        height=340,
    )
    return fig


def pass_heatmap(result: dict[str, Any], agent: str = "fine-tuned", k: int = 1) -> go.Figure:
    """Three heat maps, one per pair of difficulty axes, of the agent's pass^k averaged over the third axis (1 is
    every task passed, 0 none)."""
    a = _agent(result, agent)
    cells = a["pass_hat"]["cells"]
    if not 1 <= k <= len(next(iter(cells.values()))):
        raise ValueError(f"k={k} is not allowed: this result has pass^1..pass^{len(next(iter(cells.values())))}")
    pairs = list(combinations(range(len(AXES)), 2))
    fig = make_subplots(1, len(pairs), horizontal_spacing=0.1)
    levels = [str(lvl) for lvl in LEVELS]
    for n, (i, j) in enumerate(pairs, 1):
        grid = pair_grid(cells, i, j, k)
        fig.update_xaxes(title_text=AXES[j], type="category", row=1, col=n)
        fig.update_yaxes(title_text=AXES[i], type="category", row=1, col=n)
        fig.add_trace(
            go.Heatmap(
                z=grid,
                x=levels,
                y=levels,
                zmin=0,
                zmax=1,
                colorscale="Viridis",
                showscale=n == len(pairs),
                text=[["-" if v is None else f"{v:.2f}" for v in row] for row in grid],
                texttemplate="%{text}",
                hovertemplate=f"{AXES[i]} %{{y}}, {AXES[j]} %{{x}}: pass^{k} %{{z:.2f}}<extra></extra>",
            ),
            1,
            n,
        )
    fig.update_layout(title=f"{agent}: pass^{k} by difficulty (measured; mean over the third axis)", height=360)
    return fig


def axis_levels_figure(result: dict[str, Any], k: int = 1) -> go.Figure:
    """pass^k against the level of each axis (the other two averaged), one line per agent."""
    agents = result.get("agents", result)
    fig = make_subplots(1, len(AXES), subplot_titles=list(AXES), shared_yaxes=True)
    for n, axis in enumerate(AXES, 1):
        for name, a in agents.items():
            ys = [(a["pass_hat"]["axes"][axis][str(lvl)] or [None] * k)[k - 1] for lvl in LEVELS]
            colour = AGENT_COLOURS.get(name)
            fig.add_trace(
                go.Scatter(
                    x=list(LEVELS),
                    y=ys,
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=n == 1,
                    line={"color": colour},
                ),
                1,
                n,
            )
        fig.update_xaxes(tickvals=list(LEVELS), title_text="level", row=1, col=n)
    fig.update_yaxes(range=[-0.05, 1.05], title_text=f"pass^{k}", row=1, col=1)
    fig.update_layout(title=f"pass^{k} as each difficulty axis rises (measured)", height=340)
    return fig


def failure_figure(result: dict[str, Any]) -> go.Figure:
    """Episodes by outcome category (`eval.episodes.failure_category`), stacked per agent."""
    agents = result.get("agents", result)
    names = list(agents)
    categories = [c for c in CATEGORY_COLOURS if any(c in a["categories"] for a in agents.values())]
    fig = go.Figure()
    for c in categories:
        fig.add_trace(
            go.Bar(
                x=names,
                y=[agents[n]["categories"].get(c, 0) for n in names],
                name=c,
                marker_color=CATEGORY_COLOURS[c],
            )
        )
    fig.update_layout(barmode="stack", title="what went wrong, by category (episodes)", yaxis_title="episodes")
    return fig


CREDIT_STEPS = {
    "valid_calls": "valid calls",
    "right_write_tool": "right first write tool",
    "right_write_arguments": "right first write arguments",
    "right_end_state": "right end state",
}


def partial_credit_figure(result: dict[str, Any]) -> go.Figure:
    """How far each agent's episodes got, step by step (`eval.episodes.partial_credit`): the share of episodes (of
    call blocks, for valid calls) that reached each step, one group of bars per agent."""
    agents = {n: a for n, a in result.get("agents", result).items() if "partial_credit" in a}
    fig = go.Figure()
    for name, a in agents.items():
        fig.add_trace(
            go.Bar(
                x=list(CREDIT_STEPS.values()),
                y=[a["partial_credit"][key] for key in CREDIT_STEPS],
                name=name,
                marker_color=AGENT_COLOURS.get(name.removesuffix(" (free)")),
                marker_pattern_shape="/" if name.endswith(" (free)") else "",
            )
        )
    fig.update_layout(
        barmode="group", title="how far the episodes got (share, measured)", yaxis_range=[0, 1.05], height=340
    )
    return fig


# HTML views of dialogues -------------------------------------------------------------------------------------
_MARK = "background:#fde2c4;color:#a4400d;font-weight:bold;border-radius:3px;padding:0 2px"
_STYLES = {
    "system": "background:#f2f2f2",
    "user": "background:#e8f0fb",
    "assistant": "background:#fff7e6",
    "tool": "background:#e9f6ec",
    "malformed": "background:#fde8e8",
}


def special_tokens_html(text: str) -> str:
    """The prompt string as the model sees it, in a <pre> block, each special token highlighted."""
    out = html.escape(text)
    for token in sorted(SPECIAL_TOKENS, key=len, reverse=True):
        escaped = html.escape(token)
        out = out.replace(escaped, f'<span style="{_MARK}">{escaped}</span>')
    return f'<pre style="white-space:pre-wrap;font-size:12px">{out}</pre>'


def transcript_html(messages: list[dict[str, Any]], max_chars: int = 400) -> str:
    """A dialogue as a conversation: one box per message, tool calls as `name(arguments)` lines, tool results in
    green, errors (and malformed-call feedback) in red; long messages are cut at `max_chars`."""
    rows = []
    for m in messages:
        role = m.get("role", "?")
        text = m.get("content") or ""
        text = text if len(text) <= max_chars else text[:max_chars] + " …"
        style = _STYLES["malformed" if m.get("malformed") or text.startswith("Error") else role]
        body = html.escape(text)
        for call in m.get("tool_calls") or []:
            f = call.get("function", call)
            args = html.escape(json.dumps(f["arguments"], ensure_ascii=False))
            body += f'<div style="font-family:monospace;{_MARK}">→ {html.escape(f["name"])}({args})</div>'
        rows.append(
            f'<div style="{style};margin:2px 0;padding:4px 8px;border-radius:4px">'
            f"<b>{html.escape(role)}</b>: {body}</div>"
        )
    return '<div style="font-size:13px">' + "".join(rows) + "</div>"


__all__ = [
    "AGENT_COLOURS",
    "CREDIT_STEPS",
    "CATEGORY_COLOURS",
    "axis_levels_figure",
    "difficulty_figure",
    "failure_figure",
    "pair_grid",
    "partial_credit_figure",
    "pass_heatmap",
    "special_tokens_html",
    "transcript_html",
]
