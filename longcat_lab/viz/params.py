"""Activated parameters per token in the paper's convention (docs/design.md §1.4, §11.10): what each token of a
`Routing` or a `TokenTable` activated, and their histogram against the model's bounds.

- `activated_params_per_token`: the numbers, as a numpy array (notebooks and tests assert on these).
- `activated_params_histogram`: the figure.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from longcat_lab.model import accounting
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.routing import Routing
from longcat_lab.viz.activation import TokenTable
from longcat_lab.viz.common import moe_layers, to_numpy


def _scale(values: np.ndarray | float) -> tuple[float, str]:
    """A divisor and unit for parameter counts: the paper speaks in billions, our small models in millions."""
    top = float(np.max(np.abs(values)))
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if top >= div:
            return div, unit
    return 1.0, ""


def activated_params_per_token(source: Routing | TokenTable, config: ModelConfig) -> np.ndarray:
    """Activated parameters of every token (all sequences of a Routing, or every row of a TokenTable), in the
    paper's convention (`accounting.activated_params`): everything but the input embedding, plus the FFN experts the
    token actually used in each layer (3 * hidden * expert width each); zero experts cost nothing."""
    if isinstance(source, TokenTable):
        per_token, K = source.ffn_experts.sum(axis=1), source.moe_topk
        n_layers = len(source.layers)
    else:
        moe = moe_layers(source, "source")
        per_token = sum(to_numpy(r.ffn_experts_per_token).reshape(-1) for _, r in moe).astype(np.int64)
        K, n_layers = moe[0][1].topk_ids.shape[-1], len(moe)
    if (K, n_layers) != (config.moe_topk, config.num_layers):
        raise ValueError(
            f"config (moe_topk={config.moe_topk}, num_layers={config.num_layers}) does not match the "
            f"routing (top-{K} over {n_layers} MoE layers): pass the model's own config"
        )
    counts = accounting.param_counts(config)
    always = counts["total"] - counts["embedding"] - counts["experts"]
    per_pick = 3 * config.hidden_size * config.expert_ffn_hidden_size
    return always + per_token.astype(np.float64) * per_pick


def activated_params_histogram(
    source: Routing | TokenTable, config: ModelConfig, title: str | None = None
) -> go.Figure:
    """Histogram of activated parameters per token, with the model's min, max, uniform-routing and measured mean."""
    values = activated_params_per_token(source, config)
    bounds = accounting.activated_params(config)
    div, unit = _scale(bounds["max"])
    uniq, count = np.unique(values, return_counts=True)
    fig = go.Figure(
        go.Bar(
            x=uniq / div,
            y=count / values.size,
            name="tokens",
            hovertemplate=f"%{{x:.3f}}{unit}: %{{y:.1%}} of tokens<extra></extra>",
        )
    )
    marks = [
        (bounds["min"], "min (fewest FFN picks)", "grey", "dot"),
        (bounds["max"], "max (all picks FFN)", "grey", "dot"),
        (bounds["mean"], "uniform routing", "black", "dash"),
        (float(values.mean()), "measured mean", "#e45756", "solid"),
    ]
    for x, label, colour, dash in marks:
        fig.add_trace(
            go.Scatter(
                x=[x / div, x / div],
                y=[0, 1],
                mode="lines",
                name=f"{label}: {x / div:.3f}{unit}",
                line=dict(color=colour, dash=dash),
                yaxis="y2",
                hoverinfo="name",
            )
        )
    fig.update_layout(
        title=title
        or f"Activated parameters per token over {values.size} tokens<br><sup>paper convention: all but the "
        "input embedding, plus the FFN experts used</sup>",
        xaxis_title=f"activated parameters ({unit})",
        yaxis_title="share of tokens",
        height=420,
        yaxis2=dict(overlaying="y", range=[0, 1], visible=False),
        legend=dict(orientation="h", y=-0.38),  # below the axis title
    )
    return fig
