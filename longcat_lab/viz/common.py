"""What every figure module shares: one colour per domain and per token class, checks of the routing inputs, and
showing figures in a notebook (`show`, `figure_bundle`, `figure_controls`) without FigureWidget.

Shape legend for all of `longcat_lab.viz`: B batch, S sequence, L MoE layers, E = N + Z experts, N FFN experts,
Z zero experts, K top-k.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from longcat_lab.model.routing import LayerRouting, Routing

# One colour per domain and per token class, so that every figure of a notebook speaks the same colours.
# Domain names are longcat_lab.data's: prose is Shakespeare, code the Python standard library.
DOMAIN_COLOURS = {"shakespeare": "#4c78a8", "python": "#f58518", "reasoning": "#54a24b"}
CLASS_COLOURS = {
    "whitespace": "#bab0ac",
    "punctuation": "#e45756",
    "digits": "#72b7b2",
    "code keyword": "#b279a2",
    "word": "#4c78a8",
}
# Sequential scale for "how many FFN experts": light = little compute, dark = much.
COMPUTE_SCALE = "Viridis"


# Routing inputs --------------------------------------------------------------------------------------------------
def moe_layers(routing: Any, name: str = "routing") -> list[tuple[int, LayerRouting]]:
    """(model layer index, LayerRouting) for every MoE layer of a Routing record."""
    if not isinstance(routing, Routing):
        raise ValueError(
            f"{name} must be the Routing record of model(idx, return_routing=True), got {type(routing).__name__}"
        )
    layers = [(i, r) for i, r in enumerate(routing.layers) if r is not None]
    if not layers:
        raise ValueError(f"{name} holds no MoE layers (all {len(routing.layers)} are dense): nothing was routed")
    return layers


def check_layer(layer: Any, available: Sequence[int], name: str = "layer") -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in available:
        raise ValueError(f"{name}={layer!r} is not allowed: it must be one of the MoE layers {list(available)}")
    return layer


def check_batch_index(batch_index: Any, batch: int) -> int:
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not 0 <= batch_index < batch:
        raise ValueError(f"batch_index={batch_index!r} is not allowed: the routing holds sequences 0..{batch - 1}")
    return batch_index


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def expert_names(n_ffn: int, n_total: int) -> list[str]:
    """F0..F{N-1} for FFN experts, Z0..Z{Z-1} for zero (identity) experts."""
    return [f"F{i}" for i in range(n_ffn)] + [f"Z{i}" for i in range(n_total - n_ffn)]


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


# What an executed copy of a notebook shows where a live kernel would show the controls: JupyterLab falls back to a
# widget's text/plain when its state was not saved, and a raw `VBox(children=...)` repr reads like a bug.
CONTROLS_NOTE = (
    "Controls ({names}): open this notebook with a running kernel to use them; the figure shows the default."
)


class ShownFigure(go.Figure):
    """A figure that is already on screen: left as a cell's last value, it shows nothing, where a plain figure would
    draw a second, stale copy under the controls."""

    def _ipython_display_(self) -> None:
        return None

    def _repr_mimebundle_(self, *args: Any, **kwargs: Any) -> dict:
        return {}


def figure_controls(make_figure: Callable[..., go.Figure], **controls: Any) -> go.Figure:
    """Show the ipywidgets `controls` (name -> value widget) above `make_figure(**defaults)`. A saved notebook keeps
    that default figure, and a one-line note instead of the controls. In a live kernel the first change swaps the
    default figure for a one-line pointer and every change redraws one figure in an Output under the controls
    (JupyterLab's plotly renderer does not redraw a figure updated through its display handle). Returns the default
    figure as a `ShownFigure`, so a cell ending in this call draws it once. Labels are shown whole (ipywidgets cuts
    them to a fixed width by default)."""
    import ipywidgets as widgets
    from IPython.display import display

    for name, w in controls.items():
        if not isinstance(w, widgets.ValueWidget):
            raise ValueError(f"control {name}={type(w).__name__} is not allowed: it must be an ipywidgets value widget")
    for w in controls.values():
        if hasattr(w, "style") and hasattr(w.style, "description_width"):
            w.style.description_width = "initial"
    static = ShownFigure(make_figure(**{name: w.value for name, w in controls.items()}))
    out = widgets.Output()
    box = widgets.VBox([widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")), out])
    display({**box._repr_mimebundle_(), "text/plain": CONTROLS_NOTE.format(names=", ".join(controls))}, raw=True)
    handle = display(figure_bundle(static), raw=True, display_id=True)

    def redraw(_change=None) -> None:
        if handle is not None:
            handle.update({"text/plain": "(the figure follows the controls above)"}, raw=True)
        with out:
            out.clear_output(wait=True)
            try:
                show(make_figure(**{name: w.value for name, w in controls.items()}))
            except ValueError as err:  # e.g. an empty prompt typed into a text box
                print(f"cannot draw: {err}")

    for w in controls.values():
        w.observe(redraw, names="value")
    return static
