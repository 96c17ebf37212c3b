"""Named ablation sweeps at matched compute with paired seeds (docs/design.md §3.6): `sweeps` (the ablations, their
metrics' directions and equivalence margins), `runner` (plan, compute check on the target and on what ran, reuse
check, resumable runs in parallel processes, the seed-growing loop), `stats` (paired intervals, TOST, MDE, the
outlier rule and the verdict rule), `diagnose` (outlier runs against their paired twins), `summary` (per-run
metrics, the summary table, restating a stored summary by today's rule)."""

from longcat_lab.experiments.diagnose import outlier_runs
from longcat_lab.experiments.runner import (
    ComputeMismatchError,
    check_matched,
    check_reusable,
    compute_table,
    plan,
    run_growing,
    run_sweep,
)
from longcat_lab.experiments.stats import compare, outliers, paired, verdict
from longcat_lab.experiments.summary import format_summary, restate, run_metrics
from longcat_lab.experiments.sweeps import SWEEPS, Sweep

__all__ = [
    "ComputeMismatchError",
    "check_matched",
    "check_reusable",
    "compute_table",
    "plan",
    "run_growing",
    "run_sweep",
    "compare",
    "outliers",
    "outlier_runs",
    "paired",
    "verdict",
    "format_summary",
    "restate",
    "run_metrics",
    "SWEEPS",
    "Sweep",
]
