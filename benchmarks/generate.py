"""Generation speed: our `LongCatLM.generate` against transformers' on the same exported checkpoint, and KV-cache bytes.

Exports a freshly initialised model (default preset `small`, non-zero router bias) with `longcat_lab.export.save_hf`,
loads the folder back with our `load_hf` and with `transformers.AutoModelForCausalLM`, then times greedy generation
of the same prompts at batch 1 and 8, interleaving the two libraries and keeping each one's best of `--repeats`
runs. Prints tokens/s, the speed ratio ours/transformers (goal: >= 2; the median of back-to-back pairs, in wall
clock and in process CPU time), whether the greedy tokens agree, and the KV-cache bytes per token of both against
full keys and values.

Run:  .venv/bin/python benchmarks/generate.py [--preset small] [--batch-sizes 1 8] [--new-tokens 64] [--threads 1]
      .venv/bin/python benchmarks/generate.py --smoke     # tiny preset, a few seconds (checks the script runs)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from longcat_lab.export import cache_bytes_per_token, load_hf, save_hf
from longcat_lab.model import presets
from longcat_lab.testing import random_ids, random_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    # Two shared cores: with two threads both libraries' tiny matmuls spin-wait on a core a neighbour holds, and
    # timings swing 4x from run to run. One thread measures the code; both libraries get the same setting.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny preset, 8 new tokens, 1 repeat")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.new_tokens, args.repeats, args.prompt_len = "tiny", 8, 1, 8
    for name in ("prompt_len", "new_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes={args.batch_sizes} is not allowed: every batch size must be >= 1")
    return args


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result); CPU time is what the run itself used on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    args = parse_args()
    try:
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise SystemExit(f"transformers is required for this benchmark ({err}); install the 'hf' extra") from err
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    config = presets.get(args.preset)
    # A trained model's expert bias is not zero: draw one, so that routing depends on it.
    model = random_model(config, args.seed, bias_std=0.05)

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf(model, Path(tmp) / "export")
        ours = load_hf(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    n_params = ours.num_params()
    print(
        f"preset={args.preset} ({n_params / 1e6:.1f}M params), prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, greedy, {args.threads} thread(s), {args.repeats} repeats; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        "tok/s: best run of each; ratio: median over repeats of transformers' time / ours in back-to-back runs "
        "(wall clock; 'cpu' uses process CPU time)"
    )
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'cpu ratio':>9}  same tokens")
    for batch in args.batch_sizes:
        prompt = random_ids(config, (batch, args.prompt_len), seed=args.seed + batch)
        runs = {
            "ours": lambda prompt=prompt: ours.generate(prompt, args.new_tokens),
            "hf": lambda prompt=prompt: hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            ),
        }
        best = {name: (float("inf"), float("inf")) for name in runs}
        ratios, cpu_ratios, outputs = [], [], {}
        for fn in runs.values():  # warm-up: first calls allocate and fill caches
            fn()
        for _ in range(args.repeats):
            times = {}
            for name, fn in runs.items():
                times[name] = timed(fn)
                outputs[name] = times[name][2]
                best[name] = (min(best[name][0], times[name][0]), min(best[name][1], times[name][1]))
            # Paired ratios (the two runs are seconds apart) cancel the slow drift of a shared machine's load.
            ratios.append(times["hf"][0] / times["ours"][0])
            cpu_ratios.append(times["hf"][1] / times["ours"][1])
        tokens = batch * args.new_tokens
        same = torch.equal(outputs["ours"], outputs["hf"])
        print(
            f"{batch:>5} {tokens / best['ours'][0]:>11.1f} {tokens / best['hf'][0]:>9.1f} "
            f"{statistics.median(ratios):>6.2f} {statistics.median(cpu_ratios):>9.2f}  {same}"
        )
    sizes = cache_bytes_per_token(ours, prompt, hf)
    ours_bytes, formula = sizes["longcat_lab LatentCache"], sizes["MLA formula"]
    print(
        f"KV cache bytes/token/sequence: ours {ours_bytes}, transformers {sizes['transformers cache']}, "
        f"(kv_lora_rank + qk_rope_head_dim) x {2 * config.num_layers} blocks x dtype = {formula}; "
        f"full K/V would be {sizes['full K/V']} ({sizes['full K/V'] / ours_bytes:.1f}x)"
    )
    assert ours_bytes == formula, "our latent cache does not have the MLA size"


if __name__ == "__main__":
    main()
