"""Named ablation sweeps at matched compute with paired seeds (docs/design.md §13): `sweeps` (the seven
ablations), `runner` (plan, compute check, resumable runs in parallel processes), `stats` (paired differences and
the verdict rule), `summary` (per-run metrics and the summary table)."""
