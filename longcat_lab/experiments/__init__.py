"""Named ablation sweeps at matched compute with paired seeds (docs/design.md §3.6): `sweeps` (the seven
ablations), `runner` (plan, compute check, resumable runs in parallel processes), `stats` (paired differences and
the verdict rule), `summary` (per-run metrics and the summary table)."""

from longcat_lab.experiments.runner import (
    ComputeMismatchError,
    check_matched,
    compute_table,
    plan,
    run_sweep,
)
from longcat_lab.experiments.stats import paired, verdict
from longcat_lab.experiments.summary import format_summary, run_metrics
from longcat_lab.experiments.sweeps import SWEEPS, Sweep

__all__ = [
    "ComputeMismatchError",
    "check_matched",
    "compute_table",
    "plan",
    "run_sweep",
    "paired",
    "verdict",
    "format_summary",
    "run_metrics",
    "SWEEPS",
    "Sweep",
]
