"""`longcat-lab notebooks [--smoke] [--only 01 03]`: execute the numbered notebooks with papermill."""

from __future__ import annotations

import argparse
from pathlib import Path

# The repository's notebooks folder, beside the package.
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def add_parser(subparsers) -> argparse.ArgumentParser:
    nb = subparsers.add_parser("notebooks", help="execute the numbered notebooks with papermill")
    nb.add_argument("--out", type=Path, default=Path("build/notebooks"), help="folder for the executed copies")
    nb.add_argument("--smoke", action="store_true", help="run each notebook's fast smoke configuration")
    nb.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 03")
    return nb


def run_notebooks(out: Path, smoke: bool, only: list[str] | None = None) -> None:
    """Execute the numbered notebooks with papermill into `out` (kernel python3), stopping at the first failure."""
    import papermill  # the `notebooks` extra

    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    if not paths:
        raise SystemExit(f"no notebooks found under {NOTEBOOKS}")
    out.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(paths, 1):
        print(f"[longcat-lab] {n}/{len(paths)} {path.name} (smoke={smoke})", flush=True)
        papermill.execute_notebook(  # its progress bar counts the cells
            str(path),
            str(out / path.name),
            kernel_name="python3",
            parameters={"smoke": smoke},
            cwd=str(NOTEBOOKS),
            progress_bar=True,
        )
    print(f"[longcat-lab] executed {len(paths)} notebooks into {out.resolve()}: open them with `jupyter lab {out}`")


def run(args: argparse.Namespace) -> None:
    run_notebooks(args.out, args.smoke, args.only)


__all__ = ["NOTEBOOKS", "add_parser", "run", "run_notebooks"]
