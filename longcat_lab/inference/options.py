"""A checkpoint made ready for decoding as `longcat-lab sample` and `longcat-lab serve` ask (`--quantize`,
`--compile`, `--speculative`): `load_for_decoding` loads it and applies the switches (docs/design.md §6.2 for the
MTP draft, §6.3-6.4 for int8 and compile)."""

from __future__ import annotations

from pathlib import Path

from longcat_lab import checkpoint
from longcat_lab._util import check_choice
from longcat_lab.inference.compiled import compile_decoding
from longcat_lab.inference.quant import quantize_int8

QUANTIZE = ("none", "int8")


def load_for_decoding(ckpt: Path, quantize: str = "none", compiled: bool = False, speculative: bool = False):
    """(model, tokenizer, meta) of the checkpoint `ckpt`, int8-quantised (`quantize="int8"`) and compiled as asked.
    A `speculative` request for a checkpoint without the MTP module is refused before minutes of quantising or
    compiling."""
    check_choice("quantize", quantize, QUANTIZE)
    model, tokenizer, meta = checkpoint.load(ckpt)
    if speculative and model.mtp is None:
        raise ValueError(f"--speculative is not allowed: {ckpt} has no MTP module (train an MTP stage first)")
    if quantize == "int8":
        model = quantize_int8(model)
    if compiled:
        model = compile_decoding(model)
    return model, tokenizer, meta


__all__ = ["QUANTIZE", "load_for_decoding"]
