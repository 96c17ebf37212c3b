"""Figures of expert activation token by token (docs/design.md §1.4; the paper's Appendix A.1): which FFN experts
every token of a text used, and FFN experts per token by domain and token class.

Each figure builder returns a plotly `go.Figure`; the numbers behind it come from a separate function that returns
numpy arrays, so that notebooks and tests assert on the data rather than on the picture.

- `route_text`: tokenise a text and route it through a model.
- `token_compute` / `token_compute_map`: a text with each token coloured by the FFN experts it used.
- `token_table` / `contrast` / `ffn_experts_by_group` / `class_domain_heatmap`: FFN experts per token by domain and
  token class.
Activated parameters per token (paper convention) are in `viz.params`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from longcat_lab._util import check_int
from longcat_lab.data.tokenclass import TOKEN_CLASSES, token_class
from longcat_lab.model.routing import Routing
from longcat_lab.viz.common import (
    CLASS_COLOURS,
    COMPUTE_SCALE,
    DOMAIN_COLOURS,
    check_batch_index,
    check_layer,
    moe_layers,
    to_numpy,
)


# Routing a text ------------------------------------------------------------------------------------------------
def route_text(
    model: torch.nn.Module, tokenizer: Any, text: str, max_tokens: int | None = None
) -> tuple[list[str], Routing]:
    """Tokenise `text` with a `tokenizers.Tokenizer` (anything whose `encode(text)` has `.ids` and `.offsets`), route
    it through `model` in eval mode under no_grad (router counts untouched) and return (token texts, Routing).

    Token texts are the slices of `text` each token covers, so a character that byte-level BPE splits over several
    tokens shows in each of them, rather than as replacement characters."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text={text!r} is not allowed: it must be a non-empty str")
    enc = tokenizer.encode(text)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} is not allowed: it must be a positive integer or None")
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise ValueError(f"text has {len(ids)} tokens: more than max_position_embeddings={limit}; pass max_tokens")
    tokens = [text[a:b] for a, b in offsets]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            routing = model(torch.tensor([ids], device=model.device), return_routing=True).routing
    finally:
        model.train(was_training)
    return tokens, routing


# Token compute map ---------------------------------------------------------------------------------------------
def token_compute(routing: Routing, batch_index: int = 0) -> np.ndarray:
    """FFN experts each token of one sequence used, per MoE layer: [S, L] ints."""
    moe = moe_layers(routing)
    check_batch_index(batch_index, moe[0][1].topk_ids.shape[0])
    return np.stack([to_numpy(r.ffn_experts_per_token[batch_index]) for _, r in moe], axis=1).astype(np.int64)


def display_token(token: str) -> str:
    """A token's text made visible in a figure: newlines and tabs as symbols, a leading space as a dot."""
    shown = token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    if shown.startswith(" "):
        shown = "·" + shown[1:]
    # plotly renders text as HTML: escape the characters that would otherwise start or break a tag.
    return shown.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") or "∅"


def token_compute_map(
    tokens: Sequence[str],
    routing: Routing,
    layer: int | None = None,
    batch_index: int = 0,
    per_row: int = 12,
    title: str | None = None,
) -> go.Figure:
    """The text as a grid of tokens, each coloured by the FFN experts it used (summed over MoE layers, or in one
    `layer`); hovering shows the chosen experts of every layer."""
    moe = moe_layers(routing)
    layers = [i for i, _ in moe]
    per_layer = token_compute(routing, batch_index)  # [S, L]
    S = per_layer.shape[0]
    if len(tokens) != S or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"tokens has {len(tokens)} entries: expected {S} strings, one per routed position")
    check_int("per_row", per_row)
    if layer is None:
        values = per_layer.sum(axis=1)
        what = f"FFN experts summed over {len(layers)} MoE layers"
    else:
        values = per_layer[:, layers.index(check_layer(layer, layers))]
        what = f"FFN experts in layer {layer}"
    K = moe[0][1].topk_ids.shape[-1]
    N = routing.n_routed_experts
    zmax = min(K, N) * (len(layers) if layer is None else 1)
    ids = [to_numpy(r.topk_ids[batch_index]) for _, r in moe]  # L x [S, K]
    rows = math.ceil(S / per_row)
    row_px = 44  # one row of tokens, text included
    z = np.full((rows, per_row), np.nan)
    text = [[""] * per_row for _ in range(rows)]
    hover = [[""] * per_row for _ in range(rows)]
    for s in range(S):
        r, c = divmod(s, per_row)
        z[r, c] = values[s]
        text[r][c] = display_token(tokens[s])
        lines = []
        for (li, _), chosen in zip(moe, ids):
            ffn = sorted(int(e) for e in chosen[s] if e < N)
            lines.append(f"layer {li}: {len(ffn)} FFN {ffn} + {K - len(ffn)} zero")
        hover[r][c] = f"#{s} {text[r][c]}<br>{values[s]} {what}<br>" + "<br>".join(lines)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            hovertext=hover,
            hoverinfo="text",
            zmin=0,
            zmax=zmax,
            colorscale=COMPUTE_SCALE,
            xgap=2,
            ygap=2,
            textfont=dict(size=13),
            # A colorbar as tall as the grid (at least 120 px): the default follows the plot's height fraction,
            # which leaves a sliver for a short text.
            colorbar=dict(title="FFN experts", thickness=14, lenmode="pixels", len=max(120, row_px * rows)),
        )
    )
    fig.update_layout(
        title=title or f"Compute per token: {what}",
        # Fixed margins and row height, so a short text still gets readable rows.
        height=90 + max(row_px * rows, 120),
        margin=dict(t=60, b=20, l=10, r=10),
        xaxis=dict(visible=False),
        yaxis=dict(visible=False, autorange="reversed"),
        plot_bgcolor="white",
    )
    return fig


# FFN experts by domain and token class -------------------------------------------------------------------------
@dataclass
class TokenTable:
    """One row per routed token of a set of samples: where it came from, its class, and its FFN experts per layer."""

    domain: np.ndarray  # [T] str
    sample: np.ndarray  # [T] int, index of the sample the token belongs to
    position: np.ndarray  # [T] int, position within its sample
    token: np.ndarray  # [T] str
    token_class: np.ndarray  # [T] str, one of tokenclass.TOKEN_CLASSES
    ffn_experts: np.ndarray  # [T, L] int
    layers: list[int]  # model layer index of each column of ffn_experts
    moe_topk: int
    n_routed_experts: int

    def __len__(self) -> int:
        return len(self.token)

    def values(self, layer: int | None = None) -> np.ndarray:
        """FFN experts per token, summed over MoE layers or in one layer: [T]."""
        if layer is None:
            return self.ffn_experts.sum(axis=1)
        return self.ffn_experts[:, self.layers.index(check_layer(layer, self.layers))]

    def groups(self, by: str) -> np.ndarray:
        """The grouping key of every token: "domain", "class", or "domain/class"."""
        if by == "domain":
            return self.domain
        if by == "class":
            return self.token_class
        if by == "domain/class":
            return np.array([f"{d}/{c}" for d, c in zip(self.domain, self.token_class)], dtype=object)
        raise ValueError(f"by={by!r} is not allowed: it must be 'domain', 'class' or 'domain/class'")

    def stats(self, by: str = "domain", layer: int | None = None) -> dict[str, dict[str, float]]:
        """Per group: token count, mean and std of FFN experts per token, over every token of the group."""
        keys, vals = self.groups(by), self.values(layer)
        out = {}
        for g in _ordered(keys):
            v = vals[keys == g]
            out[g] = {"count": int(v.size), "mean": float(v.mean()), "std": float(v.std())}
        return out


def _ordered(keys: np.ndarray) -> list[str]:
    """Group names in a stable, readable order: known domains and classes first, the rest in first-seen order."""
    seen = list(dict.fromkeys(keys.tolist()))
    rank = {name: i for i, name in enumerate([*DOMAIN_COLOURS, *TOKEN_CLASSES])}
    return sorted(seen, key=lambda g: (*(rank.get(part, len(rank)) for part in g.split("/")), seen.index(g)))


def token_table(
    samples: Iterable[tuple[str, Sequence[str], Routing]], code_domains: Sequence[str] = ("python",)
) -> TokenTable:
    """Build a TokenTable from `(domain, tokens, routing)` triples, one per sample, each routing from a forward of
    that sample alone (batch 1). Python keywords count as "code keyword" only in `code_domains`."""
    cols: dict[str, list] = {k: [] for k in ("domain", "sample", "position", "token", "token_class", "ffn")}
    layers, K, N = None, None, None
    for n, item in enumerate(samples):
        if not (isinstance(item, tuple) and len(item) == 3):
            raise ValueError(f"samples[{n}] must be a (domain, tokens, routing) tuple, got {type(item).__name__}")
        domain, tokens, routing = item
        if not isinstance(domain, str) or not domain:
            raise ValueError(f"samples[{n}] domain={domain!r} is not allowed: it must be a non-empty str")
        moe = moe_layers(routing, f"samples[{n}] routing")
        if moe[0][1].topk_ids.shape[0] != 1:
            raise ValueError(
                f"samples[{n}] routing has batch {moe[0][1].topk_ids.shape[0]}: expected 1 sequence per sample"
            )
        these = [i for i, _ in moe]
        if layers is None:
            layers, K, N = these, moe[0][1].topk_ids.shape[-1], routing.n_routed_experts
        elif these != layers:
            raise ValueError(f"samples[{n}] routes through MoE layers {these}, the first sample through {layers}")
        per_layer = token_compute(routing)
        if len(tokens) != per_layer.shape[0] or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"samples[{n}] tokens has {len(tokens)} entries: expected {per_layer.shape[0]} strings")
        code = domain in code_domains
        cols["domain"] += [domain] * len(tokens)
        cols["sample"] += [n] * len(tokens)
        cols["position"] += list(range(len(tokens)))
        cols["token"] += list(tokens)
        cols["token_class"] += [token_class(t, code) for t in tokens]
        cols["ffn"].append(per_layer)
    if layers is None:
        raise ValueError("samples is empty: expected at least one (domain, tokens, routing) tuple")
    return TokenTable(
        domain=np.array(cols["domain"], dtype=object),
        sample=np.array(cols["sample"]),
        position=np.array(cols["position"]),
        token=np.array(cols["token"], dtype=object),
        token_class=np.array(cols["token_class"], dtype=object),
        ffn_experts=np.concatenate(cols["ffn"]),
        layers=layers,
        moe_topk=K,
        n_routed_experts=N,
    )


def contrast(
    table: TokenTable, group: str, reference: str, by: str = "class", layer: int | None = None
) -> dict[str, Any]:
    """Mean FFN experts per token of `group` minus that of `reference` (groups of `by`), with Welch's standard error,
    and a verdict: "fewer" or "more" when the difference is beyond two standard errors, else "no clear difference".
    Tokens within a text are not independent, so the standard error is optimistic; read it as a rough guide."""
    keys, vals = table.groups(by), table.values(layer).astype(np.float64)
    present = sorted(set(keys.tolist()))
    for name, g in (("group", group), ("reference", reference)):
        if g not in present:
            raise ValueError(f"{name}={g!r} is not allowed: the table's {by} groups are {present}")
    a, b = vals[keys == group], vals[keys == reference]
    diff = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) if a.size > 1 and b.size > 1 else math.inf
    verdict = "no clear difference" if not abs(diff) > 2 * se else ("fewer" if diff < 0 else "more")
    return {
        "group": group,
        "reference": reference,
        "by": by,
        "layer": layer,
        "group_mean": float(a.mean()),
        "reference_mean": float(b.mean()),
        "group_count": int(a.size),
        "reference_count": int(b.size),
        "difference": diff,
        "standard_error": se,
        "verdict": verdict,
    }


def ffn_experts_by_group(
    table: TokenTable, by: str = "domain", layer: int | None = None, title: str | None = None
) -> go.Figure:
    """Left: the share of a group's tokens that used 0, 1, 2, ... FFN experts. Right: each group's mean ± std."""
    keys, vals = table.groups(by), table.values(layer)
    stats = table.stats(by, layer)
    top = min(table.moe_topk, table.n_routed_experts) * (len(table.layers) if layer is None else 1)
    xs = np.arange(top + 1)
    colours = {**DOMAIN_COLOURS, **CLASS_COLOURS}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], subplot_titles=("share of tokens", "mean ± std"))
    for g, s in stats.items():
        v = vals[keys == g]
        share = np.bincount(v, minlength=top + 1)[: top + 1] / v.size
        colour = colours.get(g.split("/")[-1])
        fig.add_trace(
            go.Bar(
                x=xs,
                y=share,
                name=f"{g} (n={s['count']})",
                marker_color=colour,
                legendgroup=g,
                hovertemplate=f"{g}<br>%{{x}} FFN experts: %{{y:.1%}} of tokens<extra></extra>",
            ),
            1,
            1,
        )
        fig.add_trace(
            go.Bar(
                x=[g],
                y=[s["mean"]],
                error_y=dict(type="data", array=[s["std"]]),
                marker_color=colour,
                legendgroup=g,
                showlegend=False,
                hovertemplate=f"{g}: mean %{{y:.2f}} ± {s['std']:.2f} over {s['count']} tokens<extra></extra>",
            ),
            1,
            2,
        )
    where = f"layer {layer}" if layer is not None else f"summed over {len(table.layers)} MoE layers"
    fig.update_layout(
        title=title or f"FFN experts per token by {by} ({where})",
        barmode="group",
        height=440,
        legend=dict(orientation="h", y=-0.42),  # below the axis title and the rotated tick labels
        margin=dict(b=130),
    )
    fig.update_xaxes(title_text="FFN experts per token", row=1, col=1)
    return fig


def class_domain_heatmap(table: TokenTable, layer: int | None = None, title: str | None = None) -> go.Figure:
    """Mean FFN experts per token for each (domain, token class), with the token count in every cell."""
    domains = _ordered(table.domain)
    classes = [c for c in TOKEN_CLASSES if c in set(table.token_class.tolist())]
    stats = table.stats("domain/class", layer)
    z = np.full((len(domains), len(classes)), np.nan)
    text = [[""] * len(classes) for _ in domains]
    for i, d in enumerate(domains):
        for j, c in enumerate(classes):
            s = stats.get(f"{d}/{c}")
            if s:
                z[i, j] = s["mean"]
                text[i][j] = f"{s['mean']:.2f}<br>n={s['count']}"
    where = f"layer {layer}" if layer is not None else f"summed over {len(table.layers)} MoE layers"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=classes,
            y=domains,
            text=text,
            texttemplate="%{text}",
            colorscale=COMPUTE_SCALE,
            colorbar=dict(title="mean FFN experts"),
            hovertemplate="%{y} / %{x}: %{z:.2f} FFN experts per token<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"Mean FFN experts per token by domain and token class ({where})",
        height=140 + 60 * len(domains),
        yaxis=dict(autorange="reversed"),
    )
    return fig
