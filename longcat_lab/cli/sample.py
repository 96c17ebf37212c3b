"""`longcat-lab sample --ckpt RUN --prompt TEXT`: sample text from a checkpoint (or the newest one of a run folder),
optionally int8-quantised, compiled or decoded speculatively with the MTP draft."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from longcat_lab._util import check_text
from longcat_lab.cli.arguments import add_decoding_arguments, check_sampling, load_decoding_model
from longcat_lab.inference.speculative import speculative_generate
from longcat_lab.train import sample_text


def add_parser(subparsers) -> argparse.ArgumentParser:
    sa = subparsers.add_parser("sample", help="sample text from a checkpoint (or the newest one of a run folder)")
    sa.add_argument("--ckpt", type=Path, required=True)
    sa.add_argument("--prompt", required=True)
    sa.add_argument("--max-new-tokens", type=int, default=100)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top-p", type=float, default=0.95)
    sa.add_argument("--seed", type=int, default=0)
    add_decoding_arguments(sa)
    return sa


def run(args: argparse.Namespace) -> None:
    check_sampling(args, lowest_new_tokens=0)
    if not args.prompt:
        raise ValueError("--prompt='' is not allowed: it must be a non-empty string")
    check_text("--prompt", args.prompt)
    model, tokenizer, meta = load_decoding_model(args)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if not args.speculative:
        print(sample_text(model, tokenizer, args.prompt, seed=args.seed, **options))
        return
    idx = torch.tensor([tokenizer.encode(args.prompt).ids], device=model.device)
    model.check_ids("--prompt", idx)
    options["generator"] = torch.Generator(device=model.device).manual_seed(args.seed)
    out, stats = speculative_generate(model, idx, options.pop("max_new_tokens"), **options)
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=False))
    print(
        f"[longcat-lab] speculative: {sum(stats.accepted)} of {stats.drafted} drafts accepted "
        f"({stats.acceptance_rate:.0%}), {stats.tokens_per_forward:.2f} tokens per main-model forward",
        file=sys.stderr,
    )


__all__ = ["add_parser", "run"]
