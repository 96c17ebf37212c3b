"""The `longcat-lab` command line. `longcat-lab --help` lists the subcommands."""

from __future__ import annotations

import argparse
import sys

from longcat_lab.cli import (
    arithmetic,
    chat,
    figures,
    notebooks,
    sample,
    serve,
    sft,
    sweep,
    synth,
    train,
)
from longcat_lab.cli import eval as evaluate
from longcat_lab.cli.arguments import run_command

# One module per subcommand, each with `add_parser(subparsers)` and `run(args)`, in the order --help lists them.
COMMANDS = {
    "train": train,
    "sample": sample,
    "eval": evaluate,
    "sft": sft,
    "sweep": sweep,
    "synth": synth,
    "arithmetic": arithmetic,
    "chat": chat,
    "serve": serve,
    "notebooks": notebooks,
    "figures": figures,
}
# Their failures come from papermill or the browser, where the whole traceback is what helps.
TRACEBACK_COMMANDS = ("notebooks", "figures")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longcat-lab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # torchrun's workers get the same command
    runner = COMMANDS[args.command].run
    if args.command in TRACEBACK_COMMANDS:
        runner(args)
        return 0
    return run_command(args, runner)


__all__ = ["COMMANDS", "main", "parser"]
