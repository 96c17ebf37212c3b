"""The `longcat-lab` command line. `longcat-lab --help` lists the subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_notebooks(out: Path, smoke: bool, only: list[str] | None = None) -> None:
    """Execute the numbered notebooks with papermill into `out` (kernel python3), stopping at the first failure."""
    import papermill

    root = Path(__file__).resolve().parent.parent / "notebooks"
    paths = sorted(root.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    if not paths:
        raise SystemExit(f"no notebooks found under {root}")
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        print(f"[longcat-lab] executing {path.name} (smoke={smoke}) -> {out / path.name}", flush=True)
        papermill.execute_notebook(str(path), str(out / path.name), kernel_name="python3",
                                   parameters={"smoke": smoke}, cwd=str(root), progress_bar=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longcat-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebooks", help="execute the numbered notebooks with papermill")
    nb.add_argument("--out", type=Path, default=Path("build/notebooks"), help="folder for the executed copies")
    nb.add_argument("--smoke", action="store_true", help="run each notebook's fast smoke configuration")
    nb.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 03")
    args = parser.parse_args(argv)
    if args.command == "notebooks":
        run_notebooks(args.out, args.smoke, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
