"""The decoding switches that `longcat-lab sample` and `longcat-lab serve` share: `add_decoding_arguments` puts
`--quantize`, `--compile` and `--speculative` on a parser, and `load_for_decoding` loads a checkpoint and applies
them (docs/design.md §5 for the MTP draft, §16 for int8 and compile)."""

from __future__ import annotations

import argparse


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=("none", "int8"), default="none", help="int8: weight-only, per channel")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding attention and dense FFNs (slower on the CPUs measured; minutes to build)",
    )
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="decode with the checkpoint's MTP module as the draft (batch 1; needs an MTP checkpoint)",
    )


def load_for_decoding(args: argparse.Namespace):
    """(model, tokenizer, meta) of `args.ckpt`, quantised and compiled as `args` asks. A `--speculative` request
    for a checkpoint without the MTP module is refused before minutes of quantising or compiling."""
    from longcat_lab import checkpoint

    model, tokenizer, meta = checkpoint.load(args.ckpt)
    if args.speculative and model.mtp is None:
        raise ValueError(f"--speculative is not allowed: {args.ckpt} has no MTP module (train an MTP stage first)")
    if args.quantize == "int8":
        from longcat_lab.inference.quant import quantize_int8

        model = quantize_int8(model)
    if args.compile:
        from longcat_lab.inference.compiled import compile_decoding

        model = compile_decoding(model)
    return model, tokenizer, meta
