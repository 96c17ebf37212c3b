"""Figures, as plotly `go.Figure`s (the one folder that imports plotly, the `notebooks` extra): expert load and the
controller (`viz.routing`), token-level activation (`viz.activation`) and activated parameters (`viz.params`), a
training run (`viz.training`), exports (`viz.export`), serving cost and overlap timelines (`viz.perf`), the
explanatory diagrams of notebook 01 (`viz.diagrams`), and `show(fig)` for notebooks (`viz.common`)."""

from longcat_lab.viz.activation import (
    TokenTable,
    class_domain_heatmap,
    contrast,
    display_token,
    ffn_experts_by_group,
    route_text,
    token_compute,
    token_compute_map,
    token_table,
)
from longcat_lab.viz.common import CLASS_COLOURS, DOMAIN_COLOURS, figure_bundle, figure_controls, show
from longcat_lab.viz.diagrams import layer_dataflow, param_table
from longcat_lab.viz.export import cache_bytes_figure, checkpoint_bytes_figure, logits_parity_figure
from longcat_lab.viz.params import activated_params_histogram, activated_params_per_token
from longcat_lab.viz.perf import gantt_figure, timeline_figure, tpot_figure
from longcat_lab.viz.routing import (
    CONTROLLER_KEYS,
    ExpertLoad,
    coactivation,
    coactivation_heatmap,
    controller_traces,
    expert_load,
    expert_load_heatmap,
    router_counts,
    router_similarity,
    router_similarity_heatmap,
)
from longcat_lab.viz.training import LivePlot, baseline_figure, loss_curves, schedule_figure

__all__ = [
    "TokenTable",
    "activated_params_histogram",
    "activated_params_per_token",
    "class_domain_heatmap",
    "contrast",
    "display_token",
    "ffn_experts_by_group",
    "route_text",
    "token_compute",
    "token_compute_map",
    "token_table",
    "CLASS_COLOURS",
    "DOMAIN_COLOURS",
    "figure_bundle",
    "figure_controls",
    "show",
    "layer_dataflow",
    "param_table",
    "cache_bytes_figure",
    "checkpoint_bytes_figure",
    "logits_parity_figure",
    "gantt_figure",
    "timeline_figure",
    "tpot_figure",
    "CONTROLLER_KEYS",
    "ExpertLoad",
    "coactivation",
    "coactivation_heatmap",
    "controller_traces",
    "expert_load",
    "expert_load_heatmap",
    "router_counts",
    "router_similarity",
    "router_similarity_heatmap",
    "LivePlot",
    "baseline_figure",
    "loss_curves",
    "schedule_figure",
]
