"""Named ablation sweeps at matched compute with paired seeds (docs/design.md §3.6): `sweeps` (the ablations, their
metrics' directions and equivalence margins), `runner` (plan, compute check on the target and on what ran,
resumable runs in parallel processes, the seed-growing loop), `reuse` (a run folder only for its own configuration,
runs another sweep finished adopted), `stats` (paired intervals, TOST, MDE, the outlier rule, the verdict rule, rank
correlation and frequency intervals), `diagnose` (outlier runs against their paired twins, the slow-basin study),
`summary` (per-run metrics, the summary table, restating a stored summary by today's rule)."""

from longcat_lab.experiments.diagnose import basin_study, early_overshoot, outlier_runs
from longcat_lab.experiments.reuse import adopt_twins, check_reusable
from longcat_lab.experiments.runner import (
    ComputeMismatchError,
    check_matched,
    compute_table,
    plan,
    run_growing,
    run_sweep,
)
from longcat_lab.experiments.stats import compare, outliers, paired, spearman, verdict, wilson_interval
from longcat_lab.experiments.summary import format_summary, headline_metric, restate, run_metrics, validation_se
from longcat_lab.experiments.sweeps import SWEEPS, Sweep

__all__ = [
    "ComputeMismatchError",
    "adopt_twins",
    "basin_study",
    "check_matched",
    "check_reusable",
    "compute_table",
    "early_overshoot",
    "plan",
    "run_growing",
    "run_sweep",
    "compare",
    "outliers",
    "outlier_runs",
    "paired",
    "spearman",
    "verdict",
    "wilson_interval",
    "format_summary",
    "headline_metric",
    "restate",
    "run_metrics",
    "validation_se",
    "SWEEPS",
    "Sweep",
]
