"""Explanatory figures for notebook 01: the dataflow of one LongCat layer and the parameter table.

Both return plotly `go.Figure`s. Routing and training figures live in `longcat_lab.viz`.
"""

from __future__ import annotations

import plotly.graph_objects as go

from longcat_lab.model import accounting
from longcat_lab.model.config import ModelConfig

# (name, x, y, kind) for each box; kind picks the colour. y grows downwards through the layer.
_BOXES = {
    "scmoe": [
        ("x", 0, 0, "io"),
        ("N_in0", 0, 1, "norm"),
        ("MLA_0", 0, 2, "attn"),
        ("+ h1", 0, 3, "add"),
        ("N_post0 → u", 0, 4, "norm"),
        ("FFN_0", 0, 5, "ffn"),
        ("+ h2", 0, 6, "add"),
        ("N_in1", 0, 7, "norm"),
        ("MLA_1", 0, 8, "attn"),
        ("+ h3", 0, 9, "add"),
        ("N_post1", 0, 10, "norm"),
        ("FFN_1", 0, 11, "ffn"),
        ("+ y", 0, 12, "add"),
        ("MoE(u)<br>router over N FFN<br>+ Z zero experts", 1.5, 8, "moe"),
    ],
    "vanilla": [
        ("x", 0, 0, "io"),
        ("N_in0", 0, 1, "norm"),
        ("MLA_0", 0, 2, "attn"),
        ("+ h1", 0, 3, "add"),
        ("N_post0", 0, 4, "norm"),
        ("FFN_0", 0, 5, "ffn"),
        ("+ h2", 0, 6, "add"),
        ("N_in1", 0, 7, "norm"),
        ("MLA_1", 0, 8, "attn"),
        ("+ h3", 0, 9, "add"),
        ("N_post1 → v", 0, 10, "norm"),
        ("FFN_1", 0, 11, "ffn"),
        ("+ y", 0, 12, "add"),
        ("MoE(v)<br>router over N FFN<br>+ Z zero experts", 1.5, 10.5, "moe"),
    ],
}
_COLOURS = {"io": "#eeeeee", "norm": "#fff2cc", "attn": "#cfe2f3", "ffn": "#d9ead3", "add": "#ffffff", "moe": "#f4cccc"}


def layer_dataflow(style: str = "scmoe") -> go.Figure:
    """One LongCat layer as boxes and arrows. In "scmoe" the MoE branch leaves right after the first attention
    (from u) and joins at the last addition, so its dispatch and combine can hide under FFN_0, MLA_1 and FFN_1; in
    "vanilla" it leaves from N_post1 and only FFN_1 runs beside it."""
    if style not in _BOXES:
        raise ValueError(f"style={style!r} is not allowed: it must be one of {sorted(_BOXES)}")
    boxes = _BOXES[style]
    pos = {name: (x, y) for name, x, y, _ in boxes}
    fig = go.Figure()
    for name, x, y, kind in boxes:
        width, height = (0.55, 0.8) if kind == "moe" else (0.5, 0.35)
        fig.add_shape(
            type="rect",
            x0=x - width,
            x1=x + width,
            y0=y - height,
            y1=y + height,
            fillcolor=_COLOURS[kind],
            line=dict(color="#555555"),
        )
        fig.add_annotation(x=x, y=y, text=name, showarrow=False, font=dict(size=12))

    def arrow(start: tuple[float, float], end: tuple[float, float], colour: str = "#555555") -> None:
        fig.add_annotation(
            x=end[0],
            y=end[1],
            ax=start[0],
            ay=start[1],
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=2,
            arrowwidth=1.5,
            arrowcolor=colour,
            text="",
        )

    spine = [name for name, x, _, kind in boxes if kind != "moe"]
    for a, b in zip(spine, spine[1:]):
        arrow((0, pos[a][1] + 0.35), (0, pos[b][1] - 0.35))
    moe_x, moe_y = pos[boxes[-1][0]]
    source_y = pos["N_post0 → u" if style == "scmoe" else "N_post1 → v"][1]
    arrow((0.5, source_y), (moe_x, moe_y - 0.8), colour="#cc0000")
    arrow((moe_x, moe_y + 0.8), (0.5, pos["+ y"][1]), colour="#cc0000")
    title = (
        "ScMoE layer: the MoE reads u right after MLA_0 and joins at the end"
        if style == "scmoe"
        else "Vanilla order: the MoE waits for MLA_1 (same parameters)"
    )
    fig.update_layout(
        title=title,
        title_font_size=14,
        width=620,
        height=620,
        plot_bgcolor="white",
        margin=dict(l=10, r=10, t=50, b=10),
        xaxis=dict(visible=False, range=[-0.7, 2.2]),
        yaxis=dict(visible=False, range=[12.8, -0.8]),
    )
    return fig


def param_table(configs: dict[str, ModelConfig]) -> go.Figure:
    """Total and activated (min / mean at uniform routing / max) parameters per named config, in millions or
    billions, in the paper's convention (activated excludes the input embedding)."""
    rows = {
        "model": [],
        "style": [],
        "total": [],
        "activated min": [],
        "activated mean": [],
        "activated max": [],
        "experts N+Z, top-K": [],
    }

    def fmt(n: float) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    for name, c in configs.items():
        act = accounting.activated_params(c)
        rows["model"].append(name)
        rows["style"].append(c.layer_style)
        rows["total"].append(fmt(accounting.param_counts(c)["total"]))
        rows["activated min"].append(fmt(act["min"]))
        rows["activated mean"].append(fmt(act["mean"]))
        rows["activated max"].append(fmt(act["max"]))
        rows["experts N+Z, top-K"].append(f"{c.n_routed_experts}+{c.zero_expert_num}, top-{c.moe_topk}")
    fig = go.Figure(
        go.Table(
            header=dict(values=list(rows), fill_color="#cfe2f3", align="left"),
            cells=dict(values=list(rows.values()), align="left"),
        )
    )
    fig.update_layout(
        title="Parameters; activated = all but the input embedding, plus the chosen FFN experts",
        title_font_size=13,
        height=160 + 40 * len(configs),
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig
