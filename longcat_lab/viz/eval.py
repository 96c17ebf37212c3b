"""Figures of evaluation and experiments: the published score tables of the 560B model as a radar chart and a
grouped bar chart (every title says these are published numbers, not measured here), bits per byte per domain of an
evaluation (`longcat_lab.eval`) against its reference points, one sweep metric per variant with every seed shown
and every run's per-step curve with its outlier runs marked, the slow-basin scatter and Adam's ε against the
gradient RMS (`longcat_lab.experiments`), and the budget trace of the controller playground
(`testing.SyntheticRouting`)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from longcat_lab.eval.published import published_scores
from longcat_lab.experiments.diagnose import running_mean
from longcat_lab.experiments.summary import headline_metric

PUBLISHED_CAVEAT = "published scores of the 560B LongCat-Flash-Chat and peers, not measured here"
# LongCat-Flash in the house orange; the others in muted colours.
_MODEL_COLOURS = ["#f58518", "#4c78a8", "#54a24b", "#b279a2", "#72b7b2", "#e45756", "#9d755d"]


def _colours(models: list[str]) -> dict[str, str]:
    others = iter(_MODEL_COLOURS[1:])
    return {m: (_MODEL_COLOURS[0] if m.startswith("LongCat") else next(others)) for m in models}


def published_radar(table: str = "seed") -> go.Figure:
    """One closed polygon per model over the table's benchmarks (scores in percent, radial axis 0-100)."""
    t = published_scores(table)
    colours = _colours(t["models"])
    fig = go.Figure()
    names = t["benchmarks"] + t["benchmarks"][:1]
    for j, model in enumerate(t["models"]):
        values = [row[j] for row in t["scores"]]
        fig.add_trace(go.Scatterpolar(r=values + values[:1], theta=names, name=model, line={"color": colours[model]}))
    fig.update_layout(
        title=f"{table} table: {PUBLISHED_CAVEAT}",
        polar={"radialaxis": {"range": [0, 100]}},
        height=520,
    )
    return fig


def published_bars(table: str = "official") -> go.Figure:
    """Grouped bars: benchmarks along x, one bar per model."""
    t = published_scores(table)
    colours = _colours(t["models"])
    fig = go.Figure()
    for j, model in enumerate(t["models"]):
        fig.add_trace(
            go.Bar(x=t["benchmarks"], y=[row[j] for row in t["scores"]], name=model, marker_color=colours[model])
        )
    fig.update_layout(title=f"{table} table: {PUBLISHED_CAVEAT}", barmode="group", yaxis_title="score (%)", height=460)
    return fig


def bits_per_byte_figure(result: dict, title: str = "bits per byte on held-out text (measured)") -> go.Figure:
    """Grouped bars per domain: the model, the unigram baseline, gzip and lzma on the same bytes."""
    domains = list(result["bits_per_byte"])
    fig = go.Figure()
    for key, colour in (("model", "#f58518"), ("unigram", "#bab0ac"), ("gzip", "#4c78a8"), ("lzma", "#54a24b")):
        fig.add_trace(
            go.Bar(x=domains, y=[result["bits_per_byte"][d][key] for d in domains], name=key, marker_color=colour)
        )
    fig.update_layout(title=title, barmode="group", yaxis_title="bits per byte", height=380)
    return fig


def sweep_figure(summary: dict, metric: str) -> go.Figure:
    """One sweep metric: a marker per seed for every variant (the spread is shown, not hidden), lines joining each
    seed across variants (the pairing), and the variant means."""
    variants = list(summary.get("variant_order", summary["runs"]))
    seeds = sorted({s for by in summary["runs"].values() for s in by}, key=int)
    fig = go.Figure()
    for s in seeds:
        ys = [summary["runs"][v].get(s, {}).get(metric) for v in variants]
        fig.add_trace(
            go.Scatter(x=variants, y=ys, mode="lines+markers", name=f"seed {s}", line={"width": 1}, opacity=0.6)
        )
    means = []
    for v in variants:
        vals = [m.get(metric) for m in summary["runs"][v].values() if m.get(metric) is not None]
        means.append(sum(vals) / len(vals) if vals else None)
    fig.add_trace(go.Scatter(x=variants, y=means, mode="markers", name="mean", marker={"size": 14, "symbol": "x"}))
    fig.update_layout(
        title=f"sweep {summary['sweep']!r}: {metric} ({summary['seeds']} paired seeds, measured)",
        yaxis_title=metric,
        height=360,
    )
    return fig


def sweep_curves_figure(summary: dict, curve: str = "loss") -> go.Figure:
    """Every run's per-step `curve` (training loss by default; `experiments.summary.CURVES`), one colour per
    variant; the sweep's outlier runs (`summary["outlier_runs"]`) drawn thick and named in the legend."""
    variants = list(summary.get("variant_order", summary["runs"]))
    flagged = {(o["variant"], str(o["seed"])) for o in summary.get("outlier_runs", [])}
    palette = _MODEL_COLOURS
    fig = go.Figure()
    for i, v in enumerate(variants):
        for seed, run in sorted(summary["runs"][v].items(), key=lambda kv: int(kv[0])):
            ys = (run.get("curves") or {}).get(curve)
            if not ys:
                continue
            odd = (v, str(seed)) in flagged
            fig.add_trace(
                go.Scatter(
                    x=list(range(1, len(ys) + 1)),
                    y=ys,
                    mode="lines",
                    name=f"{v} seed {seed}" + (" (outlier)" if odd else ""),
                    legendgroup=v,
                    showlegend=odd or seed == min(summary["runs"][v], key=int),
                    line={"color": palette[i % len(palette)], "width": 3 if odd else 1},
                    opacity=1.0 if odd else 0.5,
                )
            )
    fig.update_layout(
        title=f"sweep {summary['sweep']!r}: {curve} per step, every run (outliers thick)",
        xaxis_title="step",
        yaxis_title=curve,
        height=360,
    )
    return fig


def sweep_panel(summary: dict, smooth: int = 10) -> go.Figure:
    """A sweep in one figure: its headline metric per seed and variant (each seed's line joins its variants, the
    means as crosses) beside every run's training loss per step (a `smooth`-step running mean; outlier runs thick)."""
    metric = headline_metric(summary)
    points, curves = sweep_figure(summary, metric), sweep_curves_figure(summary)
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.4, 0.6], subplot_titles=(f"{metric}, per seed", "training loss per step")
    )
    for t in points.data:
        fig.add_trace(t.update(showlegend=False), row=1, col=1)
    for t in curves.data:
        name = t.name if "outlier" in t.name else t.legendgroup  # the colour key names the variant
        fig.add_trace(t.update(y=running_mean(list(t.y), smooth), name=name), row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=2)
    fig.update_layout(
        title=f"sweep {summary['sweep']!r}: {summary['seeds']} paired seeds, preset {summary['preset']} (measured)",
        height=420,
        legend={"font": {"size": 9}},
    )
    return fig


def basin_figure(summary: dict, metric: str = "val_loss") -> go.Figure:
    """Every run of a sweep as one marker: its early overshoot of FFN experts per token (`experiments.diagnose`)
    against its end `metric`, one colour per variant, outlier runs (the slow basin) drawn as large open circles."""
    fig = go.Figure()
    for i, (variant, b) in enumerate((summary.get("basin") or {}).items()):
        runs = [r for r in b["per_run"] if r["early_overshoot"] is not None]
        for odd in (False, True):
            part = [r for r in runs if r["outlier"] == odd]
            if not part:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[r["early_overshoot"] for r in part],
                    y=[r[metric] for r in part],
                    mode="markers",
                    name=f"{variant} ({b['outliers']}/{b['runs']} outliers)" if not odd else f"{variant} outlier",
                    legendgroup=variant,
                    marker={
                        "color": _MODEL_COLOURS[i % len(_MODEL_COLOURS)],
                        "size": 14 if odd else 8,
                        "symbol": "circle-open" if odd else "circle",
                    },
                    text=[f"seed {r['seed']}" for r in part],
                )
            )
    fig.update_layout(
        title=f"sweep {summary['sweep']!r}: early overshoot against end {metric}, every run (measured)",
        xaxis_title="largest FFN experts per token in the first steps, minus the target",
        yaxis_title=metric,
        height=400,
    )
    return fig


def eps_ladder_figure(summary: dict, metric: str = "val_loss") -> go.Figure:
    """Adam's ε sweep read where the paper's claim lives: every run's end `metric` against ε divided by its own
    gradient RMS (log axis), one colour per ε."""
    fig = go.Figure()
    for i, variant in enumerate(summary.get("variant_order", summary["runs"])):
        eps = float(variant.split("_", 1)[1])
        runs = [r for r in summary["runs"][variant].values() if r.get("grad_rms") and r.get(metric) is not None]
        fig.add_trace(
            go.Scatter(
                x=[eps / r["grad_rms"] for r in runs],
                y=[r[metric] for r in runs],
                mode="markers",
                name=f"eps {eps:g}",
                marker={"color": _MODEL_COLOURS[i % len(_MODEL_COLOURS)], "size": 9},
            )
        )
    fig.update_xaxes(type="log", title_text="eps / gradient RMS")
    fig.update_layout(
        title=f"sweep {summary['sweep']!r}: end {metric} against eps over the gradient RMS, every run (measured)",
        yaxis_title=metric,
        height=380,
    )
    return fig


def budget_trace_figure(reports: list[dict], title: str = "controller playground: FFN experts per token") -> go.Figure:
    """The controller's reports over steps (`SyntheticRouting.run`): FFN experts per token per layer against the
    target."""
    steps = [r["step"] for r in reports]
    fig = go.Figure()
    layers = len(reports[0].get("ffn_experts_per_token", [])) if reports else 0
    for li in range(layers):
        fig.add_trace(
            go.Scatter(x=steps, y=[r["ffn_experts_per_token"][li] for r in reports], mode="lines", name=f"layer {li}")
        )
    if reports:
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[reports[0]["target_ffn_experts"]] * len(steps),
                mode="lines",
                name="target",
                line={"dash": "dash", "color": "black"},
            )
        )
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="FFN experts per token", height=360)
    return fig


__all__ = [
    "PUBLISHED_CAVEAT",
    "basin_figure",
    "bits_per_byte_figure",
    "budget_trace_figure",
    "eps_ladder_figure",
    "published_bars",
    "published_radar",
    "sweep_curves_figure",
    "sweep_figure",
    "sweep_panel",
]
