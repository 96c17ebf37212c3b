"""Figures of an export (`longcat_lab.export`; docs/design.md §1.6, §1.7): bytes on disk by tensor group, KV-cache bytes
per token, and logits of our model against transformers' on the y = x line."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from longcat_lab.export.sizes import PADDING


def checkpoint_bytes_figure(sizes: dict[str, int], title: str = "Exported checkpoint: bytes on disk by tensor group"):
    """Horizontal bars of `checkpoint_bytes`, with each group's share."""
    total = sum(sizes.values())
    names = [n for n in sizes if sizes[n]]
    fig = go.Figure(
        go.Bar(
            y=names,
            x=[sizes[n] / 1e6 for n in names],
            orientation="h",
            text=[f"{sizes[n] / 1e6:.2f} MB ({sizes[n] / total:.1%})" for n in names],
            textposition="auto",
            marker_color=["#e45756" if n == PADDING else "#4c78a8" for n in names],
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="MB",
        yaxis_autorange="reversed",
        height=120 + 40 * len(names),
        margin=dict(l=10, r=10, t=50, b=40),
    )
    return fig


def cache_bytes_figure(sizes: dict[str, int], title: str = "KV cache per token and sequence"):
    """Bars of `cache_bytes_per_token`."""
    names = list(sizes)
    fig = go.Figure(
        go.Bar(
            x=names,
            y=[sizes[n] for n in names],
            text=[f"{sizes[n]:,} B" for n in names],
            textposition="auto",
            marker_color=["#bab0ac" if n == "full K/V" else "#4c78a8" for n in names],
        )
    )
    fig.update_layout(title=title, yaxis_title="bytes per token", height=380, margin=dict(l=10, r=10, t=50, b=40))
    return fig


def logits_parity_figure(
    ours: torch.Tensor, theirs: torch.Tensor, max_points: int = 4000, title: str = "Logits: longcat_lab vs transformers"
):
    """Scatter of matching logits (an evenly spaced sample of at most `max_points`) on the y = x line."""
    if ours.shape != theirs.shape:
        raise ValueError(f"ours has shape {tuple(ours.shape)} but theirs {tuple(theirs.shape)}: they must match")
    a, b = ours.detach().float().flatten().cpu(), theirs.detach().float().flatten().cpu()
    pick = torch.linspace(0, a.numel() - 1, min(max_points, a.numel())).long()
    lo, hi = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    fig = go.Figure(
        [
            go.Scattergl(
                x=a[pick].numpy(), y=b[pick].numpy(), mode="markers", marker=dict(size=3, opacity=0.5), name="logits"
            ),
            go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dash", color="grey"), name="y = x"),
        ]
    )
    diff = float((a - b).abs().max())
    fig.update_layout(
        title=f"{title} (max |difference| {diff:.1e} over {a.numel():,} logits)",
        xaxis_title="longcat_lab",
        yaxis_title="transformers",
        height=420,
        margin=dict(l=10, r=10, t=50, b=40),
    )
    return fig
