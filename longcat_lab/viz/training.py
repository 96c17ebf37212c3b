"""Figures of a training run: `loss_curves` (training and validation loss), `schedule_figure` (LR and data mixture
per stage), `baseline_figure` (validation loss against the unigram baseline), and `LivePlot`, a `train(callback=...)`
that redraws figures in a notebook while training runs. Inputs are plain: metrics rows (`train.read_metrics`), a
`TrainConfig`, dicts of losses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from longcat_lab.data import check_mixture
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.schedule import lr_at
from longcat_lab.viz.common import figure_bundle


def loss_curves(rows: Sequence[dict[str, Any]], title: str = "Training and validation loss"):
    """A plotly figure: training LM loss per step, and validation loss per domain at each evaluation."""
    train_rows = [r for r in rows if r.get("kind") == "train" and r.get("lm_loss") is not None]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[r["step"] for r in train_rows],
            y=[r["lm_loss"] for r in train_rows],
            mode="lines",
            name="train LM loss",
            line=dict(color="#888"),
        )
    )
    domains = sorted({d for r in eval_rows for d in r["val_loss"]})
    for d in domains:
        pts = [(r["step"], r["val_loss"][d]) for r in eval_rows if d in r["val_loss"]]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=f"val {d}"))
    fig.update_layout(
        title=title,
        xaxis_title="optimizer step",
        yaxis_title="cross-entropy (nats/token)",
        height=420,
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def schedule_figure(cfg: TrainConfig, title: str = "The training schedule"):
    """A plotly figure of the multi-stage schedule: LR per optimizer step (top) and each stage's data mixture
    (bottom), so the stage-2 shift toward code and reasoning is visible next to the LR it comes with."""
    fig = make_subplots(
        rows=2,
        cols=1,
        vertical_spacing=0.26,  # room for the top panel's axis title above the lower panel's title
        row_heights=[0.55, 0.45],
        subplot_titles=("learning rate", "data mixture per stage"),
    )
    steps = list(range(cfg.total_steps))
    fig.add_trace(
        go.Scatter(
            x=[s + 1 for s in steps], y=[lr_at(cfg.stages, s) for s in steps], mode="lines", name="lr", showlegend=False
        ),
        1,
        1,
    )
    names = [f"{i + 1}: {s.name} ({s.steps} steps)" for i, s in enumerate(cfg.stages)]
    for domain in cfg.data.domains:
        shares = [check_mixture(s.mixture, cfg.data.domains)[domain] for s in cfg.stages]
        fig.add_trace(go.Bar(x=names, y=shares, name=domain), 2, 1)
    fig.update_layout(title=title, barmode="stack", height=560, legend=dict(orientation="h", y=-0.15))
    fig.update_xaxes(title_text="optimizer step", row=1, col=1)
    fig.update_yaxes(title_text="share of sequences", row=2, col=1)
    return fig


def baseline_figure(
    val_loss: dict[str, float], baselines: dict[str, float], title: str = "Validation loss against the unigram baseline"
):
    """Grouped bars per domain: the trained model's validation loss and the unigram baseline on the same tokens."""
    domains = list(val_loss)
    fig = go.Figure(
        [
            go.Bar(x=domains, y=[baselines[d] for d in domains], name="unigram baseline"),
            go.Bar(x=domains, y=[val_loss[d] for d in domains], name="trained model"),
        ]
    )
    fig.update_layout(title=title, barmode="group", yaxis_title="cross-entropy (nats/token)", height=380)
    return fig


class LivePlot:
    """A `train(callback=...)` that redraws figures in a notebook every `every` rows, one output per figure.

    JupyterLab's plotly renderer keeps the graph it drew first when a display handle updates it, so a live plot
    updated only through its handle freezes on screen while the saved file moves on (and nbval, which the tests run,
    ignores display updates altogether). Here each figure starts as an ipywidgets `Output` whose contents the kernel
    replaces (a state change JupyterLab redraws; a notebook runner sees no output message at all). `finish` then
    blanks the live views through their handles and displays the final figures as new outputs, which every runner
    saves and the page shows once. `figures(rows) -> list[go.Figure]` builds what is drawn."""

    def __init__(self, figures: Callable[[list[dict[str, Any]]], list], every: int = 10):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} is not allowed: it must be a positive number of steps")
        self.figures, self.every, self.rows = figures, every, []
        self.handles: list | None = None
        self.views: list = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if row.get("kind") == "train" and row["step"] % self.every == 0:
            self.draw()

    def draw(self) -> None:
        """Draw (first call) or redraw the live figures from the rows seen so far; nothing before the first step."""
        if not any(r.get("kind") == "train" for r in self.rows):
            return
        outputs = [
            {"output_type": "display_data", "data": figure_bundle(f), "metadata": {}} for f in self.figures(self.rows)
        ]
        if self.handles is None:
            import ipywidgets as widgets
            from IPython.display import display

            self.views = [widgets.Output() for _ in outputs]
            self.handles = [
                display({**v._repr_mimebundle_(), "text/plain": LIVE_NOTE}, raw=True, display_id=True)
                for v in self.views
            ]
        for view, out in zip(self.views, outputs):
            view.outputs = (out,)

    def finish(self, rows: list[dict[str, Any]] | None = None) -> list:
        """Blank the live views and display the figures of `rows` (default: the rows seen); returns the figures."""
        from IPython.display import display

        if rows is not None:
            self.rows = list(rows)
        for h in self.handles or []:
            if h is not None:
                h.update({"text/plain": ""}, raw=True)
        for view in self.views:
            view.close()
        self.handles, self.views = None, []
        figs = self.figures(self.rows)
        for f in figs:
            display(figure_bundle(f), raw=True)
        return figs


# What a saved notebook shows where a live figure was, when its runner ignored the final blanking (nbval does).
LIVE_NOTE = "(a live figure while training ran; the final figure follows)"


__all__ = ["loss_curves", "schedule_figure", "baseline_figure", "LivePlot"]
