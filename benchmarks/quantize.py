"""Int8 weight-only quantisation against fp32 and bf16: weight memory, decoding memory, tokens/s and bits per byte.

Builds three variants of one model: fp32, bf16 (`model.to(torch.bfloat16)`) and `quantize_int8` of the fp32 model.
For each it prints the bytes of its weights (`quant.model_bytes`), the bytes its decoding store holds after
generating (transposed and absorbed copies: fp32/bf16 floats, int8 for the quantised copy), greedy tokens/s at each
batch size (the variants interleaved, best of `--repeats`), the share of greedy tokens equal to fp32's, and bits per
byte on the built-in held-out data (mean over domains) with its change against fp32.

The model is a checkpoint (`--ckpt`, a checkpoint or run folder; bits per byte on the data it was trained on) or a
seeded random model of `--preset` (bits per byte then measures the numerical change only, not quality).

Run:  .venv/bin/python benchmarks/quantize.py --ckpt runs/small [--batch-sizes 1 8] [--new-tokens 64] [--threads 1]
      .venv/bin/python benchmarks/quantize.py --preset small
      .venv/bin/python benchmarks/quantize.py --smoke     # tiny preset, a few seconds (checks the script runs)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from longcat_lab.data import DataConfig, load_dataset
from longcat_lab.eval.bpb import bits_per_byte
from longcat_lab.inference.generate import generate
from longcat_lab.inference.quant import Int8Matrix, model_bytes, quantize_int8
from longcat_lab.model import presets
from longcat_lab.testing import random_ids, random_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, help="checkpoint or run folder (default: a random --preset model)")
    p.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--windows", type=int, default=16, help="evaluation windows per domain for bits per byte")
    p.add_argument("--threads", type=int, default=1)  # see benchmarks/generate.py: one thread measures the code
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny preset, 8 new tokens, 1 repeat, 2 windows")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.new_tokens, args.repeats, args.prompt_len, args.windows = "tiny", 8, 1, 8, 2
    for name in ("prompt_len", "new_tokens", "repeats", "threads", "windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes={args.batch_sizes} is not allowed: every batch size must be >= 1")
    return args


def store_bytes(model) -> int:
    """Bytes held by a model's decoding store (each tensor or int8 matrix counted once)."""
    seen, total = set(), 0

    def walk(v):
        nonlocal total
        if isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, (torch.Tensor, Int8Matrix)) and v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            total += v.nbytes() if isinstance(v, Int8Matrix) else v.numel() * v.element_size()

    for _, value in model.decoding_weights.entries.values():
        walk(value)
    return total


def load_model(args):
    """(fp32 model, dataset, eval sequence length, what it is)."""
    if args.ckpt is None:
        model = random_model(presets.get(args.preset), args.seed, bias_std=0.05)
        data = DataConfig()
        return model, load_dataset(model.config.vocab_size, data), 256, f"random {args.preset} model"
    from longcat_lab import checkpoint
    from longcat_lab.train.config import TrainConfig

    model, _, meta = checkpoint.load(args.ckpt)
    ckpt = checkpoint.resolve(args.ckpt)
    tc = TrainConfig.from_dict(json.loads((ckpt / "train_config.json").read_text()))
    seq_len = tc.eval_seq_len or tc.stages[0].seq_len
    return model.float(), load_dataset(model.config.vocab_size, tc.data), seq_len, f"{ckpt} (step {meta.get('step')})"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    fp32, dataset, seq_len, what = load_model(args)
    variants = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16), "int8": quantize_int8(fp32)}
    print(
        f"{what}: {fp32.num_params() / 1e6:.1f}M params, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"greedy, {args.threads} thread(s), best of {args.repeats}; bits/byte on {args.windows} windows x {seq_len} "
        f"tokens per domain; torch {torch.__version__}"
    )
    rows = {name: {} for name in variants}
    for batch in args.batch_sizes:
        prompt = random_ids(fp32.config, (batch, args.prompt_len), seed=args.seed + batch)
        outputs, best = {}, {name: float("inf") for name in variants}
        for name, model in variants.items():  # warm-up: builds the decoding stores
            outputs[name] = generate(model, prompt, args.new_tokens)
        for _ in range(args.repeats):
            for name, model in variants.items():
                t = time.perf_counter()
                generate(model, prompt, args.new_tokens)
                best[name] = min(best[name], time.perf_counter() - t)
        for name in variants:
            new = outputs[name][:, args.prompt_len :]
            same = float((new == outputs["fp32"][:, args.prompt_len :]).float().mean())
            rows[name][batch] = (batch * args.new_tokens / best[name], same)
    bpb = {}
    for name, model in variants.items():
        with torch.inference_mode():
            result = bits_per_byte(model, dataset, seq_len, args.windows, compressors=False)
        bpb[name] = statistics.mean(r.model for r in result.values())
    header = " ".join(f"{'tok/s b' + str(b):>10} {'same':>5}" for b in args.batch_sizes)
    print(f"{'variant':>7} {'weights MB':>10} {'store MB':>8} {header} {'bits/byte':>9} {'change':>9}")
    for name, model in variants.items():
        speed = " ".join(f"{rows[name][b][0]:>10.1f} {rows[name][b][1]:>5.2f}" for b in args.batch_sizes)
        print(
            f"{name:>7} {model_bytes(model) / 1e6:>10.2f} {store_bytes(model) / 1e6:>8.2f} {speed} "
            f"{bpb[name]:>9.5f} {bpb[name] - bpb['fp32']:>+9.5f}"
        )
    ratio = " ".join(f"b{b} {rows['int8'][b][0] / rows['fp32'][b][0]:.2f}x" for b in args.batch_sizes)
    print(
        f"RESULT int8/fp32: weights {model_bytes(variants['int8']) / model_bytes(fp32):.2f}x, "
        f"decoding store {store_bytes(variants['int8']) / store_bytes(fp32):.2f}x, tokens/s {ratio}, "
        f"bits/byte {bpb['int8'] - bpb['fp32']:+.5f}"
    )


if __name__ == "__main__":
    main()
