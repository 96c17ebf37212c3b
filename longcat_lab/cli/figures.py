"""`longcat-lab figures [--out docs/figures] [--sweeps RESULTS]`: render the README's figures, or one figure per
committed sweep summary, to PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    fg = subparsers.add_parser(
        "figures", help="render the README's figures to PNG (plotly static export, system Chromium)"
    )
    fg.add_argument("--out", type=Path, default=Path("docs/figures"), help="folder for the PNGs")
    fg.add_argument("--sweeps", type=Path, help="draw one figure per sweep summary in this folder (e.g. results)")
    return fg


def run(args: argparse.Namespace) -> None:
    # viz needs plotly (the `notebooks` extra): every other subcommand works without it.
    from longcat_lab.viz.gallery import render, sweep_figures

    paths = sweep_figures(args.sweeps, args.out) if args.sweeps else render(args.out)
    print(*(f"[longcat-lab] wrote {p}" for p in paths), sep="\n")


__all__ = ["add_parser", "run"]
