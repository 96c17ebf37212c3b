"""Figures of serving and overlap performance: one layer's schedule as a Gantt chart and the time per output token
from the serving cost model (`perf.costmodel`; paper 5.3, Table 7), and per-rank timelines of profiled
expert-parallel steps (`perf.trace`; docs/design.md §7.1, SBO)."""

from __future__ import annotations

import plotly.graph_objects as go

from longcat_lab.perf.costmodel import SCHEDULE_NAMES, LayerTimes, layer_gantt
from longcat_lab.perf.trace import LANES, Span, step_windows

# Cost model: one colour per stage of a layer.
STAGE_COLORS = {
    "attn0": "#1f77b4",
    "dense0": "#2ca02c",
    "dispatch": "#ff7f0e",
    "moe": "#d62728",
    "combine": "#ffbb78",
    "dense1": "#98df8a",
}


def gantt_figure(
    times: LayerTimes, title: str = "one layer, one decode step", schedules: tuple[str, ...] = ("sequential", "sbo")
) -> go.Figure:
    """The sequential and/or the SBO schedule of one layer, one lane for compute and one for the network, in µs."""
    fig = go.Figure()
    shown = set()
    for schedule in schedules:
        for lane, stage, start, end in layer_gantt(times, schedule):
            if end <= start:
                continue
            fig.add_trace(
                go.Bar(
                    y=[f"{schedule} · {lane}"],
                    x=[(end - start) * 1e6],
                    base=[start * 1e6],
                    orientation="h",
                    name=stage,
                    legendgroup=stage,
                    showlegend=stage not in shown,
                    marker_color=STAGE_COLORS[stage],
                    hovertemplate=f"{stage}: %{{x:.0f}} µs<extra>{schedule}</extra>",
                )
            )
            shown.add(stage)
    order = [f"{s} · {lane}" for s in reversed(schedules) for lane in ("network", "compute")]
    fig.update_layout(
        barmode="overlay",
        title=title,
        xaxis_title="µs",
        height=380,
        # Below the plot in one row: a legend beside it is cut to the plot's height and scrolls.
        legend=dict(title="stage", orientation="h", y=-0.3),
        yaxis=dict(categoryorder="array", categoryarray=order),
    )
    return fig


def tpot_figure(results: dict[str, dict], title: str = "time per output token and cost") -> go.Figure:
    """Bars of TPOT per schedule for one or more labelled `estimate`-like results
    ({label: {schedule: {"tpot_s", "cost_per_million"}}}), cost in the bar text."""
    fig = go.Figure()
    for label, per_schedule in results.items():
        names = [SCHEDULE_NAMES[s] for s in per_schedule]
        fig.add_trace(
            go.Bar(
                x=names,
                y=[v["tpot_s"] * 1e3 for v in per_schedule.values()],
                name=label,
                text=[f"{v['tpot_s'] * 1e3:.1f} ms<br>${v['cost_per_million']:.3f}/M" for v in per_schedule.values()],
                textposition="outside",
            )
        )
    fig.update_layout(barmode="group", title=title, yaxis_title="TPOT (ms)", height=420)
    return fig


# Profiled traces: one colour per part of a layer (the "ep.<part>" labels) and per kind of communication, never two
# parts in one colour (the legend would not tell them apart).
PART_COLORS = {
    "embed": "#7f7f7f",
    "head": "#393b79",
    "attn0": "#1f77b4",
    "attn1": "#aec7e8",
    "ffn0": "#2ca02c",
    "ffn1": "#98df8a",
    "router": "#9467bd",
    "sort": "#c5b0d5",
    "experts": "#d62728",
    "finish": "#ff9896",
    "dispatch.launch": "#c49c94",
    "combine.launch": "#8c564b",
    "counts": "#bcbd22",
    "dispatch.wait": "#e377c2",
    "combine.wait": "#f7b6d2",
    "exchange": "#ff7f0e",
    "counts exchange": "#ffbb78",
    "gpu kernel": "#17becf",
}


def timeline_figure(traces: list[list[Span]], schedule: str, title: str | None = None, step: int = 0) -> go.Figure:
    """A Gantt-style timeline of profiled step number `step` of `schedule`: for every rank, lanes for compute,
    launch, wait and communication, bars coloured by part. Times in ms from that step's earliest start."""
    all_windows = [step_windows(spans, schedule) for spans in traces]
    if not all(0 <= step < len(w) for w in all_windows):
        raise ValueError(
            f"step={step!r} is not allowed: it must be between 0 and "
            f"{min(len(w) for w in all_windows) - 1} (profiled steps of {schedule!r})"
        )
    windows = [w[step] for w in all_windows]
    origin = min(w[0] for w in windows)
    bars: dict[str, dict[str, list]] = {}
    for spans, (lo, hi) in zip(traces, windows):
        for s in spans:
            if s.lane == "step" or s.end <= lo or s.start >= hi:
                continue
            start, end = max(s.start, lo), min(s.end, hi)
            bar = bars.setdefault(s.name, {"y": [], "x": [], "base": []})
            bar["y"].append(f"rank {s.rank} · {s.lane}")
            bar["x"].append((end - start) / 1e3)
            bar["base"].append((start - origin) / 1e3)
    fig = go.Figure()
    for name, bar in bars.items():  # one trace per part keeps the figure small and the legend clickable
        fig.add_trace(
            go.Bar(
                y=bar["y"],
                x=bar["x"],
                base=bar["base"],
                orientation="h",
                name=name,
                marker_color=PART_COLORS.get(name, "#333333"),
                hovertemplate=f"{name}<br>start %{{base:.2f}} ms, %{{x:.3f}} ms<extra>%{{y}}</extra>",
            )
        )
    ranks = sorted({s.rank for spans in traces for s in spans})
    order = [f"rank {r} · {lane}" for r in reversed(ranks) for lane in reversed(LANES)]
    fig.update_layout(
        barmode="overlay",
        title=title or f"{schedule} schedule, one forward step",
        xaxis_title="time since the step started (ms)",
        # Tall enough for the legend too (one row per part), so its last entries are not cut off.
        height=max(140 + 45 * len(order), 200 + 24 * len(fig.data)),
        yaxis=dict(categoryorder="array", categoryarray=order),
        legend_title="part",
    )
    return fig
