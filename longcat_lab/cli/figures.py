"""`longcat-lab figures [--out docs/figures]`: render the README's figures to PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    fg = subparsers.add_parser(
        "figures", help="render the README's figures to PNG (plotly static export, system Chromium)"
    )
    fg.add_argument("--out", type=Path, default=Path("docs/figures"), help="folder for the PNGs")
    return fg


def run(args: argparse.Namespace) -> None:
    # viz needs plotly (the `notebooks` extra): every other subcommand works without it.
    from longcat_lab.viz.gallery import render

    print(*(f"[longcat-lab] wrote {p}" for p in render(args.out)), sep="\n")


__all__ = ["add_parser", "run"]
