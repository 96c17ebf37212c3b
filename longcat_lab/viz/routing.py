"""Figures of how tokens spread over experts (docs/design.md §1.4, §2): the load of every expert against its ideal
share, the budget controller over a training run, which experts fire together, and how alike router rows are.

Each figure builder returns a plotly `go.Figure`; the numbers behind it come from a separate function that returns
numpy arrays, so that notebooks and tests assert on the data rather than on the picture. Inputs are plain: the
`Routing` record of `model(idx, return_routing=True)`, the `ModelConfig`, a model, and a run folder's
`metrics.jsonl` (read with `train.read_metrics`).

- `expert_load` / `expert_load_heatmap`: layer x expert load relative to the ideal share, dead and hot experts marked.
- `controller_traces`: the budget controller over a training run.
- `coactivation` / `router_similarity` and their heatmaps: which experts fire together, how alike router rows are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from longcat_lab.model.config import ModelConfig
from longcat_lab.model.moe import MoE
from longcat_lab.model.routing import Routing
from longcat_lab.train import metrics
from longcat_lab.train.telemetry import read_metrics
from longcat_lab.viz.common import check_layer, expert_names, moe_layers, to_numpy


# Expert load ---------------------------------------------------------------------------------------------------
@dataclass
class ExpertLoad:
    """Selections per expert and layer, and how far each is from its ideal share, as `metrics.routing_health` defines
    it: an FFN expert's ideal is the FFN selections actually made spread evenly over the N FFN experts (so a budget
    error does not show up as imbalance), a zero expert's the zero selections spread over the Z zero experts. FFN
    experts below `metrics.DEAD_LOAD` of the ideal are dead, above `metrics.HOT_LOAD` hot; zero experts are never
    flagged, since they are interchangeable identities."""

    counts: np.ndarray  # [L, E] selections per expert
    ideal: np.ndarray  # [L, E] selections each expert would get at its ideal share
    relative: np.ndarray  # [L, E] counts / ideal; 0 where the ideal is 0 (no FFN or no zero selections)
    dead: np.ndarray  # [L, E] bool, FFN experts only
    hot: np.ndarray  # [L, E] bool, FFN experts only
    layers: list[int]  # model layer index of each row
    tokens: np.ndarray  # [L] tokens routed in each layer
    ffn_experts_per_token: np.ndarray  # [L] mean FFN experts per token in each layer
    n_routed_experts: int


def router_counts(model: torch.nn.Module) -> np.ndarray:
    """The routers' training-time selection counts (`router.expert_counts`), stacked to [L, E]. Only training
    forwards add to them and the controller clears them every optimizer step, so this is the current step's load."""
    blocks = model.moe_blocks()
    if not blocks:
        raise ValueError("model has no MoE blocks (layer_style='dense'): there are no router counts")
    return np.stack([to_numpy(b.router.expert_counts) for b in blocks])


def expert_load(source: Routing | np.ndarray | torch.Tensor, config: ModelConfig) -> ExpertLoad:
    """Load per layer and expert from a Routing record (every token of every sequence), a list of them (counts
    added up), or counts [L, E] such as `router_counts(model)`."""
    N, E, K = config.n_routed_experts, config.num_experts, config.moe_topk
    if isinstance(source, Routing):
        source = [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(r, Routing) for r in source):
        counts, layers = 0, None
        for n, routing in enumerate(source):
            moe = moe_layers(routing, f"source[{n}]")
            if layers is not None and [i for i, _ in moe] != layers:
                raise ValueError(
                    f"source[{n}] routes through MoE layers {[i for i, _ in moe]}, source[0] through {layers}"
                )
            layers = [i for i, _ in moe]
            counts = counts + np.stack([np.bincount(to_numpy(r.topk_ids).reshape(-1), minlength=E) for _, r in moe])
    elif isinstance(source, (np.ndarray, torch.Tensor, list)):
        counts = to_numpy(source) if isinstance(source, torch.Tensor) else np.asarray(source)
        layers = list(range(counts.shape[0])) if counts.ndim == 2 else []
    else:
        raise ValueError(
            f"source must be the Routing record of model(idx, return_routing=True) or counts [L, E] "
            f"such as router_counts(model), got {type(source).__name__}"
        )
    if counts.ndim != 2 or counts.shape[1] != E:
        raise ValueError(
            f"source has shape {counts.shape}: expected [layers, n_routed_experts + zero_expert_num] = [L, {E}]"
        )
    if (counts < 0).any():
        raise ValueError("source holds negative counts: expected selections per expert (>= 0)")
    counts = counts.astype(np.int64)
    tokens = counts.sum(axis=1) / K  # every token makes exactly K selections per layer
    if (tokens == 0).any():
        empty = [layers[i] for i in np.flatnonzero(tokens == 0)]
        raise ValueError(f"source has no selections in layer(s) {empty}: nothing to measure")
    ffn, zero = counts[:, :N].sum(1), counts[:, N:].sum(1)
    ideal = np.concatenate(
        [np.repeat((ffn / N)[:, None], N, 1), np.repeat((zero / max(E - N, 1))[:, None], E - N, 1)], axis=1
    )
    relative = counts / np.where(ideal > 0, ideal, 1.0)  # counts are 0 wherever the ideal is
    dead = np.zeros_like(counts, dtype=bool)
    hot = np.zeros_like(counts, dtype=bool)
    dead[:, :N] = relative[:, :N] < metrics.DEAD_LOAD
    hot[:, :N] = relative[:, :N] > metrics.HOT_LOAD
    return ExpertLoad(counts, ideal, relative, dead, hot, layers, tokens, ffn / tokens, N)


def expert_load_heatmap(load: ExpertLoad, title: str | None = None) -> go.Figure:
    """Layer x expert heatmap of load / ideal share (1 = ideal, white), dead FFN experts marked x, hot ones ▲."""
    L, E = load.counts.shape
    names = expert_names(load.n_routed_experts, E)
    rows = [f"layer {i} ({k:.2f} FFN/token)" for i, k in zip(load.layers, load.ffn_experts_per_token)]
    top = max(2.0, float(load.relative.max()))
    hover = [
        [
            f"{rows[l]} · {names[e]}<br>selections {load.counts[l, e]} (ideal {load.ideal[l, e]:.1f})<br>"
            f"load {load.relative[l, e]:.2f}× ideal"
            for e in range(E)
        ]
        for l in range(L)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=load.relative,
            x=names,
            y=rows,
            zmin=0,
            zmid=1,
            zmax=top,
            colorscale="RdBu_r",
            name="load / ideal",
            hovertext=hover,
            hoverinfo="text",
            colorbar=dict(title="load / ideal"),
        )
    )
    for mask, symbol, label in (
        (load.dead, "x", f"dead (< {metrics.DEAD_LOAD:g}× ideal)"),
        (load.hot, "triangle-up", f"hot (> {metrics.HOT_LOAD:g}× ideal)"),
    ):
        ll, ee = np.nonzero(mask)
        fig.add_trace(
            go.Scatter(
                x=[names[e] for e in ee],
                y=[rows[l] for l in ll],
                mode="markers",
                name=label,
                marker=dict(symbol=symbol, size=11, color="black"),
                hoverinfo="skip",
            )
        )
    if load.n_routed_experts < E:  # a line between the FFN experts and the zero experts
        fig.add_vline(x=load.n_routed_experts - 0.5, line=dict(color="black", dash="dot"))
    fig.update_layout(
        title=title
        or "Expert load relative to the ideal share<br><sup>F: FFN experts against the FFN selections made; "
        "Z: zero experts against the zero selections made</sup>",
        xaxis_title="expert",
        yaxis=dict(autorange="reversed"),
        height=200 + 40 * L,
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


# The controller over training ----------------------------------------------------------------------------------
def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, list]:
    """(steps, values) of the rows that carry `key`."""
    have = [r for r in rows if key in r and r[key] is not None]
    return np.array([r.get("step", i) for i, r in enumerate(have)]), [r[key] for r in have]


CONTROLLER_KEYS = {
    "error": "controller_error",
    "spread": "bias_spread",
    "per_layer": "ffn_experts_per_token_per_layer",
    "mean": "ffn_experts_per_token",
    "target": "target_ffn_experts",
}


def controller_traces(source: str | Path | Sequence[Mapping[str, Any]], title: str | None = None) -> go.Figure:
    """Three panels over training steps: the controller's error signal, the spread of the expert bias, and FFN
    experts per token in every layer against the target K_e. Reads `metrics.jsonl` rows (or a run folder)."""
    rows = read_metrics(source) if isinstance(source, (str, Path)) else list(source)
    if not rows:
        raise ValueError("source holds no metrics rows: expected a run folder or a non-empty list of rows")
    keys = CONTROLLER_KEYS
    if not any(keys["per_layer"] in r or keys["mean"] in r for r in rows):
        raise ValueError(
            f"source rows carry neither {keys['per_layer']!r} nor {keys['mean']!r}; keys present: "
            f"{sorted(set().union(*rows))}"
        )
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.07,
        subplot_titles=(
            "controller error (target share − measured share)",
            "expert-bias spread (max − min over FFN experts)",
            "FFN experts per token per layer",
        ),
    )
    for row, key in ((1, keys["error"]), (2, keys["spread"])):
        steps, vals = _series(rows, key)
        vals = np.asarray(vals, dtype=float)
        if vals.ndim == 2:  # one value per layer
            for l in range(vals.shape[1]):
                fig.add_trace(
                    go.Scatter(
                        x=steps,
                        y=vals[:, l],
                        mode="lines",
                        name=f"{key} layer {l}",
                        legendgroup=f"layer {l}",
                        showlegend=False,
                    ),
                    row,
                    1,
                )
        elif vals.size:
            fig.add_trace(go.Scatter(x=steps, y=vals, mode="lines", name=key, showlegend=False), row, 1)
    steps, per_layer = _series(rows, keys["per_layer"])
    if per_layer:
        arr = np.asarray(per_layer, dtype=float)
        for l in range(arr.shape[1]):
            fig.add_trace(
                go.Scatter(x=steps, y=arr[:, l], mode="lines", name=f"layer {l}", legendgroup=f"layer {l}"), 3, 1
            )
    else:
        steps, mean = _series(rows, keys["mean"])
        fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines", name="mean over layers"), 3, 1)
    steps, target = _series(rows, keys["target"])
    if target:
        fig.add_trace(
            go.Scatter(x=steps, y=target, mode="lines", name="target K_e", line=dict(color="black", dash="dash")), 3, 1
        )
    fig.update_xaxes(title_text="optimizer step", row=3, col=1)
    fig.update_layout(
        title=title or "The budget controller over training", height=640, legend=dict(orientation="h", y=-0.12)
    )
    return fig


# Expert co-activation and router similarity --------------------------------------------------------------------
def coactivation(routing: Routing | Sequence[Routing], layer: int) -> np.ndarray:
    """[E, E]: the share of tokens (all sequences of one Routing record or of a list of them) that chose both expert
    i and expert j in `layer`; the diagonal is the share of tokens that chose i."""
    records = [routing] if isinstance(routing, Routing) else list(routing)
    if not records:
        raise ValueError("routing is an empty list: expected a Routing record or a list of them")
    onehots = []
    for n, record in enumerate(records):
        moe = dict(moe_layers(record, f"routing[{n}]"))
        ids = to_numpy(moe[check_layer(layer, list(moe))].topk_ids)
        E = moe[layer].router_probs.shape[-1]
        onehot = np.zeros((ids.shape[0] * ids.shape[1], E))
        np.put_along_axis(onehot, ids.reshape(-1, ids.shape[-1]), 1.0, axis=1)
        onehots.append(onehot)
    onehot = np.concatenate(onehots)
    return onehot.T @ onehot / onehot.shape[0]


def coactivation_heatmap(routing: Routing | Sequence[Routing], layer: int, title: str | None = None) -> go.Figure:
    co = coactivation(routing, layer)
    first = routing if isinstance(routing, Routing) else routing[0]
    names = expert_names(first.n_routed_experts, co.shape[0])
    fig = go.Figure(
        go.Heatmap(
            z=co,
            x=names,
            y=names,
            colorscale="Blues",
            colorbar=dict(title="share of tokens"),
            hovertemplate="%{y} and %{x}: %{z:.1%} of tokens<extra></extra>",
        )
    )
    fig.update_layout(
        title=title
        or f"Expert co-activation, layer {layer}<br><sup>diagonal: share of tokens choosing the expert</sup>",
        yaxis=dict(autorange="reversed"),
        height=480,
        width=560,
    )
    return fig


def router_similarity(model: torch.nn.Module, layer: int) -> np.ndarray:
    """[E, E] cosine similarity between the router's rows (one per expert) in `layer`. Rows that grow alike mean
    the router cannot tell experts apart (docs/design.md §2.3: high similarity is the sign of a balance loss that
    dominates)."""
    moe_indices = [i for i, blk in enumerate(model.layers) if isinstance(blk.mlp, MoE)]
    check_layer(layer, moe_indices)
    weight = model.layers[layer].mlp.router.classifier.weight.detach().float().cpu()
    unit = torch.nn.functional.normalize(weight, dim=1)
    return (unit @ unit.t()).numpy()


def router_similarity_heatmap(model: torch.nn.Module, layer: int, title: str | None = None) -> go.Figure:
    sim = router_similarity(model, layer)
    E = sim.shape[0]
    names = expert_names(model.config.n_routed_experts, E)
    moe_indices = [i for i, blk in enumerate(model.layers) if isinstance(blk.mlp, MoE)]
    mean = metrics.router_cosine_similarity(model)[moe_indices.index(layer)]
    fig = go.Figure(
        go.Heatmap(
            z=sim,
            x=names,
            y=names,
            zmin=-1,
            zmid=0,
            zmax=1,
            colorscale="RdBu_r",
            colorbar=dict(title="cosine"),
            hovertemplate="%{y} · %{x}: cosine %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"Router-row cosine similarity, layer {layer}<br><sup>mean off-diagonal {mean:.3f}</sup>",
        yaxis=dict(autorange="reversed"),
        height=480,
        width=560,
    )
    return fig
