"""Performance numbers: the serving cost model of paper Table 7 (`perf.costmodel`), reading profiler traces of
expert-parallel steps (`perf.trace`), and measuring the ScMoE overlap (`perf.overlap`); parameter and FLOP
accounting from a config is `longcat_lab.model.accounting`, re-exported here. Their figures live in
`longcat_lab.viz.perf`."""

from longcat_lab.model.accounting import activated_params, flops_per_token, param_counts
from longcat_lab.perf.costmodel import Hardware, LayerTimes, Serving, estimate, layer_times, tpot
from longcat_lab.perf.trace import Span, load_trace, overlap_stats, stats_table

__all__ = [
    "activated_params",
    "flops_per_token",
    "param_counts",
    "Hardware",
    "LayerTimes",
    "Serving",
    "estimate",
    "layer_times",
    "tpot",
    "Span",
    "load_trace",
    "overlap_stats",
    "stats_table",
]
