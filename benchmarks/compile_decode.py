"""`torch.compile` of the decoding step against eager: compile time, greedy tokens/s and whether the tokens agree.

Builds a seeded random model of `--preset` (non-zero router bias), generates greedily in eager mode, then applies
`inference.compiled.compile_decoding` (MLA blocks and dense FFNs compiled, the MoE eager) to a copy and times the
first call (compilation included) and then the steady state, the two variants interleaved, best of `--repeats`.

Run:  .venv/bin/python benchmarks/compile_decode.py [--preset small] [--new-tokens 64] [--threads 1]
      .venv/bin/python benchmarks/compile_decode.py --smoke      # tiny preset, backend "eager" (tracing only)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from longcat_lab.inference.compiled import compile_decoding
from longcat_lab.inference.generate import generate
from longcat_lab.model import presets
from longcat_lab.testing import random_ids, random_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 8 tokens, 1 repeat, backend eager")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.new_tokens, args.repeats, args.backend = "tiny", 8, 1, "eager"
    for name in ("batch_size", "prompt_len", "new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    torch.set_num_threads(args.threads)
    eager = random_model(presets.get(args.preset), 0, bias_std=0.05)
    compiled = compile_decoding(copy.deepcopy(eager), backend=args.backend)
    prompt = random_ids(eager.config, (args.batch_size, args.prompt_len))
    tokens = args.batch_size * args.new_tokens
    print(
        f"preset={args.preset} ({eager.num_params() / 1e6:.1f}M params), batch {args.batch_size}, prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens, greedy, {args.threads} thread(s), backend "
        f"{args.backend}; torch {torch.__version__}"
    )
    ref = generate(eager, prompt, args.new_tokens)
    t = time.perf_counter()
    out = generate(compiled, prompt, args.new_tokens)
    print(f"first compiled call (compilation included): {time.perf_counter() - t:.1f} s")
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(args.repeats):
        for name, model in (("eager", eager), ("compiled", compiled)):
            t = time.perf_counter()
            generate(model, prompt, args.new_tokens)
            best[name] = min(best[name], time.perf_counter() - t)
    same = float((out == ref).float().mean())
    print(
        f"RESULT eager {tokens / best['eager']:.1f} tok/s, compiled {tokens / best['compiled']:.1f} tok/s "
        f"({best['eager'] / best['compiled']:.2f}x), same tokens {same:.2f}"
    )


if __name__ == "__main__":
    main()
