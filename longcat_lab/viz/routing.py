"""Figures for seeing expert activation: which experts every token uses and how much compute it gets.

Each figure builder returns a plotly `go.Figure`; the numbers behind it come from a separate function that returns
numpy arrays, so that notebooks and tests assert on the data rather than on the picture. Inputs are plain: the
`Routing` record of `model(idx, return_routing=True)`, token strings, the `ModelConfig`, and a run folder's
`metrics.jsonl`.

- `expert_load` / `expert_load_heatmap`: layer x expert load relative to the ideal share, dead and hot experts marked.
- `token_compute` / `token_compute_map`: a text with each token coloured by the FFN experts it used.
- `token_table` / `ffn_experts_by_group` / `class_domain_heatmap`: FFN experts per token by domain and token class
  (the paper's Appendix A.1 findings, docs/design.md §2).
- `activated_params_per_token` / `activated_params_histogram`: activated parameters per token, paper convention.
- `read_metrics` / `controller_traces`: the budget controller over a training run.
- `coactivation` / `router_similarity` and their heatmaps: which experts fire together, how alike router rows are.
- `show(fig)` displays a figure in a notebook without FigureWidget; `figure_controls` puts ipywidgets around one.

Shape legend: B batch, S sequence, L MoE layers, E = N + Z experts, N FFN experts, Z zero experts, K top-k.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from longcat_lab.perf import accounting

from longcat_lab.train import metrics
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LayerRouting, MoE, Routing
from longcat_lab.data.tokenclass import TOKEN_CLASSES, token_class

# One colour per domain and per token class, so that every figure of a notebook speaks the same colours.
# Domain names are longcat_lab.data's: prose is Shakespeare, code the Python standard library.
DOMAIN_COLOURS = {"shakespeare": "#4c78a8", "python": "#f58518", "reasoning": "#54a24b"}
CLASS_COLOURS = {"whitespace": "#bab0ac", "punctuation": "#e45756", "digits": "#72b7b2", "code keyword": "#b279a2",
                 "word": "#4c78a8"}
# Sequential scale for "how many FFN experts": light = little compute, dark = much.
COMPUTE_SCALE = "Viridis"


# Input checks --------------------------------------------------------------------------------------------------
def _moe_layers(routing: Any, name: str = "routing") -> list[tuple[int, LayerRouting]]:
    """(model layer index, LayerRouting) for every MoE layer of a Routing record."""
    if not isinstance(routing, Routing):
        raise ValueError(f"{name} must be the Routing record of model(idx, return_routing=True), "
                         f"got {type(routing).__name__}")
    layers = [(i, r) for i, r in enumerate(routing.layers) if r is not None]
    if not layers:
        raise ValueError(f"{name} holds no MoE layers (all {len(routing.layers)} are dense): nothing was routed")
    return layers


def _check_layer(layer: Any, available: Sequence[int], name: str = "layer") -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in available:
        raise ValueError(f"{name}={layer!r} is not allowed: it must be one of the MoE layers {list(available)}")
    return layer


def _check_batch_index(batch_index: Any, batch: int) -> int:
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not 0 <= batch_index < batch:
        raise ValueError(f"batch_index={batch_index!r} is not allowed: the routing holds sequences 0..{batch - 1}")
    return batch_index


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def _expert_names(n_ffn: int, n_total: int) -> list[str]:
    """F0..F{N-1} for FFN experts, Z0..Z{Z-1} for zero (identity) experts."""
    return [f"F{i}" for i in range(n_ffn)] + [f"Z{i}" for i in range(n_total - n_ffn)]


def _scale(values: np.ndarray | float) -> tuple[float, str]:
    """A divisor and unit for parameter counts: the paper speaks in billions, our small models in millions."""
    top = float(np.max(np.abs(values)))
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if top >= div:
            return div, unit
    return 1.0, ""


# Expert load ---------------------------------------------------------------------------------------------------
@dataclass
class ExpertLoad:
    """Selections per expert and layer, and how far each is from its ideal share, as `metrics.routing_health` defines
    it: an FFN expert's ideal is the FFN selections actually made spread evenly over the N FFN experts (so a budget
    error does not show up as imbalance), a zero expert's the zero selections spread over the Z zero experts. FFN
    experts below `metrics.DEAD_LOAD` of the ideal are dead, above `metrics.HOT_LOAD` hot; zero experts are never
    flagged, since they are interchangeable identities."""

    counts: np.ndarray             # [L, E] selections per expert
    ideal: np.ndarray              # [L, E] selections each expert would get at its ideal share
    relative: np.ndarray           # [L, E] counts / ideal; 0 where the ideal is 0 (no FFN or no zero selections)
    dead: np.ndarray               # [L, E] bool, FFN experts only
    hot: np.ndarray                # [L, E] bool, FFN experts only
    layers: list[int]              # model layer index of each row
    tokens: np.ndarray             # [L] tokens routed in each layer
    ffn_experts_per_token: np.ndarray  # [L] mean FFN experts per token in each layer
    n_routed_experts: int


def router_counts(model: torch.nn.Module) -> np.ndarray:
    """The routers' training-time selection counts (`router.expert_counts`), stacked to [L, E]. Only training
    forwards add to them and the controller clears them every optimizer step, so this is the current step's load."""
    blocks = model.moe_blocks()
    if not blocks:
        raise ValueError("model has no MoE blocks (layer_style='dense'): there are no router counts")
    return np.stack([_numpy(b.router.expert_counts) for b in blocks])


def expert_load(source: Routing | np.ndarray | torch.Tensor, config: ModelConfig) -> ExpertLoad:
    """Load per layer and expert from a Routing record (every token of every sequence), a list of them (counts
    added up), or counts [L, E] such as `router_counts(model)`."""
    N, E, K = config.n_routed_experts, config.num_experts, config.moe_topk
    if isinstance(source, Routing):
        source = [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(r, Routing) for r in source):
        counts, layers = 0, None
        for n, routing in enumerate(source):
            moe = _moe_layers(routing, f"source[{n}]")
            if layers is not None and [i for i, _ in moe] != layers:
                raise ValueError(f"source[{n}] routes through MoE layers {[i for i, _ in moe]}, source[0] through "
                                 f"{layers}")
            layers = [i for i, _ in moe]
            counts = counts + np.stack([np.bincount(_numpy(r.topk_ids).reshape(-1), minlength=E) for _, r in moe])
    elif isinstance(source, (np.ndarray, torch.Tensor, list)):
        counts = _numpy(source) if isinstance(source, torch.Tensor) else np.asarray(source)
        layers = list(range(counts.shape[0])) if counts.ndim == 2 else []
    else:
        raise ValueError(f"source must be the Routing record of model(idx, return_routing=True) or counts [L, E] "
                         f"such as router_counts(model), got {type(source).__name__}")
    if counts.ndim != 2 or counts.shape[1] != E:
        raise ValueError(f"source has shape {counts.shape}: expected [layers, n_routed_experts + zero_expert_num] "
                         f"= [L, {E}]")
    if (counts < 0).any():
        raise ValueError("source holds negative counts: expected selections per expert (>= 0)")
    counts = counts.astype(np.int64)
    tokens = counts.sum(axis=1) / K             # every token makes exactly K selections per layer
    if (tokens == 0).any():
        empty = [layers[i] for i in np.flatnonzero(tokens == 0)]
        raise ValueError(f"source has no selections in layer(s) {empty}: nothing to measure")
    ffn, zero = counts[:, :N].sum(1), counts[:, N:].sum(1)
    ideal = np.concatenate([np.repeat((ffn / N)[:, None], N, 1),
                            np.repeat((zero / max(E - N, 1))[:, None], E - N, 1)], axis=1)
    relative = counts / np.where(ideal > 0, ideal, 1.0)   # counts are 0 wherever the ideal is
    dead = np.zeros_like(counts, dtype=bool)
    hot = np.zeros_like(counts, dtype=bool)
    dead[:, :N] = relative[:, :N] < metrics.DEAD_LOAD
    hot[:, :N] = relative[:, :N] > metrics.HOT_LOAD
    return ExpertLoad(counts, ideal, relative, dead, hot, layers, tokens, ffn / tokens, N)


def expert_load_heatmap(load: ExpertLoad, title: str | None = None) -> go.Figure:
    """Layer x expert heatmap of load / ideal share (1 = ideal, white), dead FFN experts marked x, hot ones ▲."""
    L, E = load.counts.shape
    names = _expert_names(load.n_routed_experts, E)
    rows = [f"layer {i} ({k:.2f} FFN/token)" for i, k in zip(load.layers, load.ffn_experts_per_token)]
    top = max(2.0, float(load.relative.max()))
    hover = [[f"{rows[l]} · {names[e]}<br>selections {load.counts[l, e]} (ideal {load.ideal[l, e]:.1f})<br>"
              f"load {load.relative[l, e]:.2f}× ideal" for e in range(E)] for l in range(L)]
    fig = go.Figure(go.Heatmap(
        z=load.relative, x=names, y=rows, zmin=0, zmid=1, zmax=top, colorscale="RdBu_r", name="load / ideal",
        hovertext=hover, hoverinfo="text", colorbar=dict(title="load / ideal")))
    for mask, symbol, label in ((load.dead, "x", f"dead (< {metrics.DEAD_LOAD:g}× ideal)"),
                                (load.hot, "triangle-up", f"hot (> {metrics.HOT_LOAD:g}× ideal)")):
        ll, ee = np.nonzero(mask)
        fig.add_trace(go.Scatter(x=[names[e] for e in ee], y=[rows[l] for l in ll], mode="markers", name=label,
                                 marker=dict(symbol=symbol, size=11, color="black"), hoverinfo="skip"))
    if E > load.n_routed_experts:  # a line between the FFN experts and the zero experts
        fig.add_vline(x=load.n_routed_experts - 0.5, line=dict(color="black", dash="dot"))
    fig.update_layout(
        title=title or "Expert load relative to the ideal share (F = FFN experts vs the FFN selections made, "
                       "Z = zero experts vs the zero selections made)",
        xaxis_title="expert", yaxis=dict(autorange="reversed"), height=180 + 40 * L,
        legend=dict(orientation="h", y=-0.25))
    return fig


# Routing a text ------------------------------------------------------------------------------------------------
def route_text(model: torch.nn.Module, tokenizer: Any, text: str, max_tokens: int | None = None
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
            _, _, routing = model(torch.tensor([ids], device=model.device), return_routing=True)
    finally:
        model.train(was_training)
    return tokens, routing


# Token compute map ---------------------------------------------------------------------------------------------
def token_compute(routing: Routing, batch_index: int = 0) -> np.ndarray:
    """FFN experts each token of one sequence used, per MoE layer: [S, L] ints."""
    moe = _moe_layers(routing)
    _check_batch_index(batch_index, moe[0][1].topk_ids.shape[0])
    return np.stack([_numpy(r.ffn_experts_per_token[batch_index]) for _, r in moe], axis=1).astype(np.int64)


def display_token(token: str) -> str:
    """A token's text made visible in a figure: newlines and tabs as symbols, a leading space as a dot."""
    shown = token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    if shown.startswith(" "):
        shown = "·" + shown[1:]
    # plotly renders text as HTML: escape the characters that would otherwise start or break a tag.
    return shown.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") or "∅"


def token_compute_map(tokens: Sequence[str], routing: Routing, layer: int | None = None, batch_index: int = 0,
                      per_row: int = 12, title: str | None = None) -> go.Figure:
    """The text as a grid of tokens, each coloured by the FFN experts it used (summed over MoE layers, or in one
    `layer`); hovering shows the chosen experts of every layer."""
    moe = _moe_layers(routing)
    layers = [i for i, _ in moe]
    per_layer = token_compute(routing, batch_index)                        # [S, L]
    S = per_layer.shape[0]
    if len(tokens) != S or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"tokens has {len(tokens)} entries: expected {S} strings, one per routed position")
    if isinstance(per_row, bool) or not isinstance(per_row, int) or per_row < 1:
        raise ValueError(f"per_row={per_row!r} is not allowed: it must be a positive integer")
    if layer is None:
        values = per_layer.sum(axis=1)
        what = f"FFN experts summed over {len(layers)} MoE layers"
    else:
        values = per_layer[:, layers.index(_check_layer(layer, layers))]
        what = f"FFN experts in layer {layer}"
    K = moe[0][1].topk_ids.shape[-1]
    N = routing.n_routed_experts
    zmax = min(K, N) * (len(layers) if layer is None else 1)
    ids = [_numpy(r.topk_ids[batch_index]) for _, r in moe]                 # L x [S, K]
    rows = math.ceil(S / per_row)
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
    fig = go.Figure(go.Heatmap(
        z=z, text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text", zmin=0, zmax=zmax,
        colorscale=COMPUTE_SCALE, xgap=2, ygap=2, colorbar=dict(title="FFN experts")))
    fig.update_layout(title=title or f"Compute per token: {what}", height=120 + 34 * rows,
                      xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed"),
                      plot_bgcolor="white")
    return fig


# FFN experts by domain and token class -------------------------------------------------------------------------
@dataclass
class TokenTable:
    """One row per routed token of a set of samples: where it came from, its class, and its FFN experts per layer."""

    domain: np.ndarray        # [T] str
    sample: np.ndarray        # [T] int, index of the sample the token belongs to
    position: np.ndarray      # [T] int, position within its sample
    token: np.ndarray         # [T] str
    token_class: np.ndarray   # [T] str, one of tokenclass.TOKEN_CLASSES
    ffn_experts: np.ndarray   # [T, L] int
    layers: list[int]         # model layer index of each column of ffn_experts
    moe_topk: int
    n_routed_experts: int

    def __len__(self) -> int:
        return len(self.token)

    def values(self, layer: int | None = None) -> np.ndarray:
        """FFN experts per token, summed over MoE layers or in one layer: [T]."""
        if layer is None:
            return self.ffn_experts.sum(axis=1)
        return self.ffn_experts[:, self.layers.index(_check_layer(layer, self.layers))]

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


def token_table(samples: Iterable[tuple[str, Sequence[str], Routing]],
                code_domains: Sequence[str] = ("python",)) -> TokenTable:
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
        moe = _moe_layers(routing, f"samples[{n}] routing")
        if moe[0][1].topk_ids.shape[0] != 1:
            raise ValueError(f"samples[{n}] routing has batch {moe[0][1].topk_ids.shape[0]}: expected 1 sequence "
                             "per sample")
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
        domain=np.array(cols["domain"], dtype=object), sample=np.array(cols["sample"]),
        position=np.array(cols["position"]), token=np.array(cols["token"], dtype=object),
        token_class=np.array(cols["token_class"], dtype=object), ffn_experts=np.concatenate(cols["ffn"]),
        layers=layers, moe_topk=K, n_routed_experts=N)


def contrast(table: TokenTable, group: str, reference: str, by: str = "class", layer: int | None = None
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
    return {"group": group, "reference": reference, "by": by, "layer": layer, "group_mean": float(a.mean()),
            "reference_mean": float(b.mean()), "group_count": int(a.size), "reference_count": int(b.size),
            "difference": diff, "standard_error": se, "verdict": verdict}


def ffn_experts_by_group(table: TokenTable, by: str = "domain", layer: int | None = None,
                         title: str | None = None) -> go.Figure:
    """Left: the share of a group's tokens that used 0, 1, 2, ... FFN experts. Right: each group's mean ± std."""
    keys, vals = table.groups(by), table.values(layer)
    stats = table.stats(by, layer)
    top = min(table.moe_topk, table.n_routed_experts) * (len(table.layers) if layer is None else 1)
    xs = np.arange(top + 1)
    colours = {**DOMAIN_COLOURS, **CLASS_COLOURS}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35],
                        subplot_titles=("share of tokens", "mean ± std"))
    for g, s in stats.items():
        v = vals[keys == g]
        share = np.bincount(v, minlength=top + 1)[: top + 1] / v.size
        colour = colours.get(g.split("/")[-1])
        fig.add_trace(go.Bar(x=xs, y=share, name=f"{g} (n={s['count']})", marker_color=colour, legendgroup=g,
                             hovertemplate=f"{g}<br>%{{x}} FFN experts: %{{y:.1%}} of tokens<extra></extra>"), 1, 1)
        fig.add_trace(go.Bar(x=[g], y=[s["mean"]], error_y=dict(type="data", array=[s["std"]]), marker_color=colour,
                             legendgroup=g, showlegend=False,
                             hovertemplate=f"{g}: mean %{{y:.2f}} ± {s['std']:.2f} over {s['count']} tokens"
                                           "<extra></extra>"), 1, 2)
    where = f"layer {layer}" if layer is not None else f"summed over {len(table.layers)} MoE layers"
    fig.update_layout(title=title or f"FFN experts per token by {by} ({where})", barmode="group", height=380,
                      legend=dict(orientation="h", y=-0.2))
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
    fig = go.Figure(go.Heatmap(z=z, x=classes, y=domains, text=text, texttemplate="%{text}", colorscale=COMPUTE_SCALE,
                               colorbar=dict(title="mean FFN experts"),
                               hovertemplate="%{y} / %{x}: %{z:.2f} FFN experts per token<extra></extra>"))
    fig.update_layout(title=title or f"Mean FFN experts per token by domain and token class ({where})",
                      height=140 + 60 * len(domains), yaxis=dict(autorange="reversed"))
    return fig


# Activated parameters ------------------------------------------------------------------------------------------
def activated_params_per_token(source: Routing | TokenTable, config: ModelConfig) -> np.ndarray:
    """Activated parameters of every token (all sequences of a Routing, or every row of a TokenTable), in the
    paper's convention (`accounting.activated_params`): everything but the input embedding, plus the FFN experts the
    token actually used in each layer (3 * hidden * expert width each); zero experts cost nothing."""
    if isinstance(source, TokenTable):
        per_token, K = source.ffn_experts.sum(axis=1), source.moe_topk
        n_layers = len(source.layers)
    else:
        moe = _moe_layers(source, "source")
        per_token = sum(_numpy(r.ffn_experts_per_token).reshape(-1) for _, r in moe).astype(np.int64)
        K, n_layers = moe[0][1].topk_ids.shape[-1], len(moe)
    if (K, n_layers) != (config.moe_topk, config.num_layers):
        raise ValueError(f"config (moe_topk={config.moe_topk}, num_layers={config.num_layers}) does not match the "
                         f"routing (top-{K} over {n_layers} MoE layers): pass the model's own config")
    counts = accounting.param_counts(config)
    always = counts["total"] - counts["embedding"] - counts["experts"]
    per_pick = 3 * config.hidden_size * config.expert_ffn_hidden_size
    return always + per_token.astype(np.float64) * per_pick


def activated_params_histogram(source: Routing | TokenTable, config: ModelConfig,
                               title: str | None = None) -> go.Figure:
    """Histogram of activated parameters per token, with the model's min, max, uniform-routing and measured mean."""
    values = activated_params_per_token(source, config)
    bounds = accounting.activated_params(config)
    div, unit = _scale(bounds["max"])
    uniq, count = np.unique(values, return_counts=True)
    fig = go.Figure(go.Bar(x=uniq / div, y=count / values.size, name="tokens",
                           hovertemplate=f"%{{x:.3f}}{unit}: %{{y:.1%}} of tokens<extra></extra>"))
    marks = [(bounds["min"], "min (fewest FFN picks)", "grey", "dot"),
             (bounds["max"], "max (all picks FFN)", "grey", "dot"),
             (bounds["mean"], "uniform routing", "black", "dash"),
             (float(values.mean()), "measured mean", "#e45756", "solid")]
    for x, label, colour, dash in marks:
        fig.add_trace(go.Scatter(x=[x / div, x / div], y=[0, 1], mode="lines", name=f"{label}: {x / div:.3f}{unit}",
                                 line=dict(color=colour, dash=dash), yaxis="y2", hoverinfo="name"))
    fig.update_layout(
        title=title or f"Activated parameters per token over {values.size} tokens (paper convention: all but the "
                       "input embedding, plus the FFN experts used)",
        xaxis_title=f"activated parameters ({unit})", yaxis_title="share of tokens", height=380,
        yaxis2=dict(overlaying="y", range=[0, 1], visible=False), legend=dict(orientation="h", y=-0.25))
    return fig


# Training metrics and the controller ---------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl` (a run folder or the file itself); see `metrics.read_rows`."""
    return metrics.read_rows(path)


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
        raise ValueError(f"source rows carry neither {keys['per_layer']!r} nor {keys['mean']!r}; keys present: "
                         f"{sorted(set().union(*rows))}")
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        subplot_titles=("controller error (target share − measured share)",
                                        "expert-bias spread (max − min over FFN experts)",
                                        "FFN experts per token per layer"))
    for row, key in ((1, keys["error"]), (2, keys["spread"])):
        steps, vals = _series(rows, key)
        vals = np.asarray(vals, dtype=float)
        if vals.ndim == 2:   # one value per layer
            for l in range(vals.shape[1]):
                fig.add_trace(go.Scatter(x=steps, y=vals[:, l], mode="lines", name=f"{key} layer {l}",
                                         legendgroup=f"layer {l}", showlegend=False), row, 1)
        elif vals.size:
            fig.add_trace(go.Scatter(x=steps, y=vals, mode="lines", name=key, showlegend=False), row, 1)
    steps, per_layer = _series(rows, keys["per_layer"])
    if per_layer:
        arr = np.asarray(per_layer, dtype=float)
        for l in range(arr.shape[1]):
            fig.add_trace(go.Scatter(x=steps, y=arr[:, l], mode="lines", name=f"layer {l}",
                                     legendgroup=f"layer {l}"), 3, 1)
    else:
        steps, mean = _series(rows, keys["mean"])
        fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines", name="mean over layers"), 3, 1)
    steps, target = _series(rows, keys["target"])
    if target:
        fig.add_trace(go.Scatter(x=steps, y=target, mode="lines", name="target K_e",
                                 line=dict(color="black", dash="dash")), 3, 1)
    fig.update_xaxes(title_text="optimizer step", row=3, col=1)
    fig.update_layout(title=title or "The budget controller over training", height=640,
                      legend=dict(orientation="h", y=-0.12))
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
        moe = dict(_moe_layers(record, f"routing[{n}]"))
        ids = _numpy(moe[_check_layer(layer, list(moe))].topk_ids)
        E = moe[layer].router_probs.shape[-1]
        onehot = np.zeros((ids.shape[0] * ids.shape[1], E))
        np.put_along_axis(onehot, ids.reshape(-1, ids.shape[-1]), 1.0, axis=1)
        onehots.append(onehot)
    onehot = np.concatenate(onehots)
    return onehot.T @ onehot / onehot.shape[0]


def coactivation_heatmap(routing: Routing | Sequence[Routing], layer: int, title: str | None = None) -> go.Figure:
    co = coactivation(routing, layer)
    first = routing if isinstance(routing, Routing) else routing[0]
    names = _expert_names(first.n_routed_experts, co.shape[0])
    fig = go.Figure(go.Heatmap(z=co, x=names, y=names, colorscale="Blues", colorbar=dict(title="share of tokens"),
                               hovertemplate="%{y} and %{x}: %{z:.1%} of tokens<extra></extra>"))
    fig.update_layout(title=title or f"Expert co-activation in layer {layer} (diagonal: share of tokens choosing "
                                     "the expert)", yaxis=dict(autorange="reversed"), height=480, width=560)
    return fig


def router_similarity(model: torch.nn.Module, layer: int) -> np.ndarray:
    """[E, E] cosine similarity between the router's rows (one per expert) in `layer`. Rows that grow alike mean the
    router cannot tell experts apart (docs/design.md §3: high similarity is the sign of a balance loss that dominates)."""
    moe_layers = [i for i, blk in enumerate(model.layers) if isinstance(blk.mlp, MoE)]
    _check_layer(layer, moe_layers)
    weight = model.layers[layer].mlp.router.classifier.weight.detach().float().cpu()
    unit = torch.nn.functional.normalize(weight, dim=1)
    return (unit @ unit.t()).numpy()


def router_similarity_heatmap(model: torch.nn.Module, layer: int, title: str | None = None) -> go.Figure:
    sim = router_similarity(model, layer)
    E = sim.shape[0]
    names = _expert_names(model.config.n_routed_experts, E)
    moe_layers = [i for i, blk in enumerate(model.layers) if isinstance(blk.mlp, MoE)]
    mean = metrics.router_cosine_similarity(model)[moe_layers.index(layer)]
    fig = go.Figure(go.Heatmap(z=sim, x=names, y=names, zmin=-1, zmid=0, zmax=1, colorscale="RdBu_r",
                               colorbar=dict(title="cosine"),
                               hovertemplate="%{y} · %{x}: cosine %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"Router-row cosine similarity in layer {layer} (mean off-diagonal "
                                     f"{mean:.3f})", yaxis=dict(autorange="reversed"), height=480, width=560)
    return fig


# Showing figures in notebooks ----------------------------------------------------------------------------------
def figure_bundle(fig: go.Figure) -> dict[str, Any]:
    """The MIME bundle a notebook stores for a figure: plotly's own JSON type (JupyterLab, VS Code), HTML that loads
    plotly.js from its CDN (classic notebooks), and a one-line text fallback; no FigureWidget, no embedded plotly.js."""
    if not isinstance(fig, go.Figure):
        raise ValueError(f"fig must be a plotly go.Figure, got {type(fig).__name__}")
    title = fig.layout.title.text or "untitled"
    return {
        "application/vnd.plotly.v1+json": json.loads(fig.to_json()),
        "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn"),
        "text/plain": f"<plotly figure: {title}>",
    }


def show(fig: go.Figure) -> None:
    """Display a figure in a notebook (see `figure_bundle`); outside IPython, print its one-line summary."""
    bundle = figure_bundle(fig)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(bundle["text/plain"])
        return
    display(bundle, raw=True)


def figure_controls(make_figure: Callable[..., go.Figure], **controls: Any) -> go.Figure:
    """Show `make_figure(**defaults)` as a static figure (an executed notebook keeps no live widget state), then the
    ipywidgets `controls` (name -> widget) above an output area that redraws the figure on every change.
    Returns the static figure."""
    import ipywidgets as widgets
    from IPython.display import display

    for name, w in controls.items():
        if not isinstance(w, widgets.ValueWidget):
            raise ValueError(f"control {name}={type(w).__name__} is not allowed: it must be an ipywidgets value widget")
    static = make_figure(**{name: w.value for name, w in controls.items()})
    show(static)
    out = widgets.Output()

    def redraw(_change=None) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                show(make_figure(**{name: w.value for name, w in controls.items()}))
            except ValueError as err:  # e.g. an empty prompt typed into a text box
                print(f"cannot draw: {err}")

    for w in controls.values():
        w.observe(redraw, names="value")
    display(widgets.VBox([widgets.HBox(list(controls.values())), out]))
    return static


__all__ = [
    "ExpertLoad", "TokenTable", "route_text", "router_counts", "expert_load", "expert_load_heatmap", "token_compute",
    "display_token", "token_compute_map", "token_table", "contrast", "ffn_experts_by_group", "class_domain_heatmap",
    "activated_params_per_token", "activated_params_histogram", "read_metrics", "controller_traces",
    "coactivation", "coactivation_heatmap", "router_similarity", "router_similarity_heatmap", "figure_bundle",
    "show", "figure_controls", "CONTROLLER_KEYS",
]
