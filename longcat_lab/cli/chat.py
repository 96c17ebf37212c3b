"""`longcat-lab chat --ckpt RUN [--tools calculator bank shop]`: chat with a checkpoint in the terminal; the reply
streams as it is generated, and the model's tool calls are run and fed back (`agent.chat`, docs/design.md §5.5).
The calls are decoded under the offered tools' JSON schemas (docs/design.md §5.2) unless `--no-structured`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import torch

from longcat_lab import checkpoint
from longcat_lab._util import check_int
from longcat_lab.agent.chat import TOOLSETS, build_tools, converse
from longcat_lab.agent.policies import generate_reply, sft_window
from longcat_lab.cli.arguments import check_sampling
from longcat_lab.inference.structured import ToolCallDecoder


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat with a checkpoint in the terminal (streaming, optional tools)")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint folder or a run folder (its newest)")
    p.add_argument("--tools", nargs="*", default=[], metavar="NAME", help=f"any of {', '.join(TOOLSETS)}")
    p.add_argument("--system", help="system prompt (default: the chosen domains' policies)")
    p.add_argument("--env-seed", type=int, default=0, help="seed of the bank/shop database")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=192, metavar="N", help="longest reply")
    p.add_argument("--window", type=int, metavar="N", help="positions for prompt and reply (default: as trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-structured",
        action="store_true",
        help="decode tool calls freely (default: constrained to the offered tools' JSON schemas)",
    )
    return p


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    check_sampling(args)
    if args.window is not None:
        check_int("--window", args.window, 2)
    registry, policy, notes = build_tools(args.tools, args.env_seed)
    ckpt = checkpoint.resolve(args.ckpt)
    model, tokenizer, meta = checkpoint.load(ckpt)
    torch.set_num_threads(1)  # decoding a lab-sized model is one small op after another (docs/design.md §5.5)
    generator = torch.Generator().manual_seed(args.seed)
    window = args.window or sft_window(ckpt)
    if window > model.config.max_position_embeddings:
        raise ValueError(
            f"--window={window} is not allowed: it must be from 2 to the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    structured = registry.names and not args.no_structured
    decoder = ToolCallDecoder(tokenizer, model.config.vocab_size) if structured else None

    def reply(prompt: str) -> str:
        options = {"temperature": args.temperature, "top_p": args.top_p, "window": window}
        if decoder is not None:
            options["constraint"] = decoder.constraint(registry.specs())
        return generate_reply(
            model, tokenizer, prompt, args.max_new_tokens, generator=generator, on_text=write, **options
        )

    calls = " (calls constrained to their schemas)" if decoder is not None else ""
    out.write(
        f"[longcat-lab] chat with {ckpt} (step {meta.get('step')}); "
        f"tools: {', '.join(registry.names) or 'none'}{calls}\n"
    )
    for note in notes:
        out.write(f"[longcat-lab] {note}\n")
    converse(reply, registry, args.system if args.system is not None else policy, stdin, out)


__all__ = ["add_parser", "run"]
