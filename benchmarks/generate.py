"""Generation speed: our `inference.generate.generate` and MTP speculative decoding against transformers on the same
exported checkpoint, and KV-cache bytes.

Exports a model with `longcat_lab.export.save_hf` (a trained checkpoint given by `--checkpoint`, else a freshly
initialised one of `--preset` with a non-zero router bias), loads the folder back with our `load_hf` and with
`transformers.AutoModelForCausalLM` (which drops the MTP weights), then times greedy generation of the same prompts
at each batch size, interleaving the runs and keeping each one's best of `--repeats`. At batch 1, when the model has
an MTP module, it also times self-speculative greedy decoding (`inference.speculative`, one draft token) and
reports the drafts' acceptance rate. Prints tokens/s, the ratios (the median of back-to-back pairs, in wall clock
and in process CPU time; goals: plain ours >= 2x transformers; speculation >= 1.4x plain greedy and >= 3x
transformers after MTP training), whether the greedy tokens agree, and the KV-cache bytes per token.

With a checkpoint the prompts are windows of its validation text (the checkpoint's data settings), so acceptance is
measured on text like the training data; a random model gets random ids, and its untrained draft is rarely accepted.

`--train-mtp SOURCE --out RUN` instead trains the late MTP stage (docs/design.md §1.5) from a checkpoint without MTP:
the same model with `num_nextn_predict_layers=1`, started by `TrainConfig.init_from`, one stage with
`mtp_loss_weight` > 0 on the source's last data mixture.

Run:  .venv/bin/python benchmarks/generate.py --train-mtp runs/small/checkpoints/step_000100 --out runs/small-mtp
      .venv/bin/python benchmarks/generate.py --checkpoint runs/small-mtp --batch-sizes 1
      .venv/bin/python benchmarks/generate.py [--preset small] [--batch-sizes 1 8] [--new-tokens 64] [--threads 1]
      .venv/bin/python benchmarks/generate.py --smoke     # tiny preset, a few seconds (checks the script runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from longcat_lab.export import cache_bytes_per_token, load_hf, save_hf
from longcat_lab.inference.generate import generate
from longcat_lab.inference.speculative import SpeculativeStats, speculative_generate
from longcat_lab.model import presets
from longcat_lab.model.config import ModelConfig
from longcat_lab.testing import random_ids, random_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint or run folder (instead of a random model)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4, help="batch-1 prompts for speculation (acceptance varies)")
    p.add_argument("--repeats", type=int, default=5)
    # Two shared cores: with two threads both libraries' tiny matmuls spin-wait on a core a neighbour holds, and
    # timings swing 4x from run to run. One thread measures the code; both libraries get the same setting.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny preset with MTP, 8 new tokens, 1 repeat")
    p.add_argument("--train-mtp", type=Path, metavar="SOURCE", help="train the MTP stage from this checkpoint")
    p.add_argument("--out", type=Path, help="with --train-mtp: the new run folder")
    p.add_argument("--mtp-steps", type=int, default=150)
    p.add_argument("--mtp-batch", type=int, default=8)
    p.add_argument("--mtp-seq-len", type=int, default=64)
    p.add_argument("--mtp-lr", type=float, default=1e-3)
    p.add_argument("--mtp-weight", type=float, default=0.3, help="the stage's mtp_loss_weight (DeepSeek-V3: 0.3)")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.new_tokens, args.repeats, args.prompt_len, args.prompts = "tiny", 8, 1, 8, 1
    for name in ("prompt_len", "new_tokens", "repeats", "threads", "prompts", "mtp_steps", "mtp_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes={args.batch_sizes} is not allowed: every batch size must be >= 1")
    if args.train_mtp is not None and args.out is None:
        p.error("--train-mtp needs --out (the new run folder)")
    return args


def train_mtp(args: argparse.Namespace) -> None:
    """The late MTP stage from `args.train_mtp` (a checkpoint without MTP) into the run folder `args.out`."""
    from longcat_lab import checkpoint
    from longcat_lab.train.config import StageConfig, TrainConfig
    from longcat_lab.train.trainer import train

    source = checkpoint.resolve(args.train_mtp)
    model_config = ModelConfig.from_dict(json.loads((source / "config.json").read_text()))
    base = TrainConfig.from_dict(json.loads((source / "train_config.json").read_text()))
    steps = args.mtp_steps
    stage = StageConfig(
        "mtp",
        steps,
        args.mtp_lr,
        min(10, steps),
        args.mtp_seq_len,
        base.stages[-1].mixture,
        end_lr_ratio=0.3,
        mtp_loss_weight=args.mtp_weight,
    )
    cfg = dataclasses.replace(
        base,
        stages=[stage],
        batch_size=args.mtp_batch,
        init_from=str(source),
        init_keep_state=False,
        eval_every=steps,
        ckpt_every=steps,
        rg_every=0,
        num_threads=args.threads,
    )
    print(f"training the MTP stage from {source}: {steps} steps of {args.mtp_batch} x {args.mtp_seq_len} tokens")
    result = train(model_config.replace(num_nextn_predict_layers=1), cfg, args.out)
    rows = result.rows("train")
    first, last = (r["mtp_loss"] / args.mtp_weight for r in (rows[0], rows[-1]))
    print(f"MTP loss {first:.3f} -> {last:.3f}; LM loss {rows[0]['lm_loss']:.3f} -> {rows[-1]['lm_loss']:.3f}")
    print(f"checkpoint: {result.checkpoint}")


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result); CPU time is what the run itself used on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def build(args: argparse.Namespace):
    """(model, prompt source (batch, seed) -> ids, description): the checkpoint's model and validation windows, or
    a random model (with MTP for --smoke) and random ids."""
    if args.checkpoint is None:
        config = presets.get(args.preset, num_nextn_predict_layers=1 if args.smoke else 0)
        # A trained model's expert bias is not zero: draw one, so that routing depends on it.
        model = random_model(config, args.seed, bias_std=0.05)
        return model, lambda batch, seed: random_ids(config, (batch, args.prompt_len), seed=seed), args.preset
    from longcat_lab import checkpoint
    from longcat_lab.data import DataConfig, load_dataset

    model, _, meta = checkpoint.load(args.checkpoint)
    ckpt = checkpoint.resolve(args.checkpoint)
    data = DataConfig.from_dict(json.loads((ckpt / "train_config.json").read_text())["data"])
    val = torch.cat([ids.long() for _, ids in sorted(load_dataset(model.config.vocab_size, data).val.items())])

    def prompts(batch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, val.numel() - args.prompt_len, (batch,), generator=g)
        return torch.stack([val[s : s + args.prompt_len] for s in starts.tolist()])

    return model, prompts, f"checkpoint {ckpt} (step {meta.get('step')})"


def compare(runs: dict, repeats: int) -> tuple[dict, dict, dict, dict]:
    """Warm up, then time every run `repeats` times back to back: (best wall and CPU seconds per run, the paired
    wall and CPU ratios of every run to the first, each run's last output)."""
    names = list(runs)
    for fn in runs.values():  # warm-up: first calls allocate and fill caches
        fn()
    best = {n: (float("inf"), float("inf")) for n in names}
    ratios = {n: ([], []) for n in names}
    outputs = {}
    for _ in range(repeats):
        times = {}
        for name, fn in runs.items():
            times[name] = timed(fn)
            outputs[name] = times[name][2]
            best[name] = (min(best[name][0], times[name][0]), min(best[name][1], times[name][1]))
        # Paired ratios (the runs are seconds apart) cancel the slow drift of a shared machine's load.
        for name in names:
            ratios[name][0].append(times[names[0]][0] / times[name][0])
            ratios[name][1].append(times[names[0]][1] / times[name][1])
    return (
        best,
        {n: statistics.median(r[0]) for n, r in ratios.items()},
        {n: statistics.median(r[1]) for n, r in ratios.items()},
        outputs,
    )


def main() -> None:
    args = parse_args()
    if args.train_mtp is not None:
        torch.set_num_threads(args.threads)
        train_mtp(args)
        return
    try:
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise SystemExit(f"transformers is required for this benchmark ({err}); install the 'hf' extra") from err
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    model, prompts, what = build(args)
    config = model.config

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hf(model, Path(tmp) / "export")
        ours = load_hf(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    print(
        f"{what} ({ours.num_params() / 1e6:.1f}M params, MTP: {'yes' if ours.mtp is not None else 'no'}), prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens, greedy, {args.threads} thread(s), {args.repeats} repeats; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print("tok/s: best run of each; ratios: median over repeats of back-to-back pairs (wall clock; cpu: process time)")
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>9} {'ours/hf':>8} {'cpu':>5}  same tokens")
    hf_options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    for batch in args.batch_sizes:
        prompt = prompts(batch, args.seed + batch)
        runs = {
            "hf": lambda p=prompt: hf.generate(p, attention_mask=torch.ones_like(p), **hf_options),
            "ours": lambda p=prompt: generate(ours, p, args.new_tokens),
        }
        best, wall, cpu, out = compare(runs, args.repeats)
        tokens = batch * args.new_tokens
        print(
            f"{batch:>5} {tokens / best['ours'][0]:>11.1f} {tokens / best['hf'][0]:>9.1f} {wall['ours']:>8.2f} "
            f"{cpu['ours']:>5.2f}  {torch.equal(out['ours'], out['hf'])}"
        )
    if ours.mtp is not None:
        speculate(args, ours, hf, prompts, hf_options)
    sizes = cache_bytes_per_token(ours, prompt, hf)
    ours_bytes, formula = sizes["longcat_lab LatentCache"], sizes["MLA formula"]
    print(
        f"KV cache bytes/token/sequence: ours {ours_bytes}, transformers {sizes['transformers cache']}, "
        f"(kv_lora_rank + qk_rope_head_dim) x {2 * config.num_layers} blocks x dtype = {formula}; "
        f"full K/V would be {sizes['full K/V']} ({sizes['full K/V'] / ours_bytes:.1f}x)"
    )
    assert ours_bytes == formula, "our latent cache does not have the MLA size"


def speculate(args, ours, hf, prompts, hf_options) -> None:
    """Batch 1, `args.prompts` prompts: transformers, plain greedy and speculative greedy, timed back to back."""
    print(f"\nspeculative greedy decoding (MTP draft, one token per step), batch 1, {args.prompts} prompts")
    print(
        f"{'prompt':>6} {'accept':>7} {'spec tok/s':>11} {'plain tok/s':>12} {'hf tok/s':>9} {'spec/plain':>11} "
        f"{'spec/hf':>8} {'plain/hf':>9} {'cpu spec/plain':>15}  same tokens"
    )
    all_stats, summary = SpeculativeStats(), []
    for i in range(args.prompts):
        prompt = prompts(1, 1000 + args.seed + i)
        stats = SpeculativeStats()

        def spec(p=prompt, stats=stats):
            ids, run = speculative_generate(ours, p, args.new_tokens)
            stats.accepted[:] = run.accepted  # the last repeat's record stays (greedy: the same every time)
            stats.from_draft[:] = run.from_draft
            return ids

        runs = {
            "hf": lambda p=prompt: hf.generate(p, attention_mask=torch.ones_like(p), **hf_options),
            "plain": lambda p=prompt: generate(ours, p, args.new_tokens),
            "spec": spec,
        }
        best, wall, cpu, out = compare(runs, args.repeats)
        all_stats.accepted += stats.accepted
        n = args.new_tokens
        row = (wall["spec"] / wall["plain"], wall["spec"], wall["plain"], cpu["spec"] / cpu["plain"])
        summary.append(row)
        same = torch.equal(out["spec"], out["plain"]) and torch.equal(out["plain"], out["hf"])
        print(
            f"{i:>6} {stats.acceptance_rate:>7.2f} {n / best['spec'][0]:>11.1f} {n / best['plain'][0]:>12.1f} "
            f"{n / best['hf'][0]:>9.1f} {row[0]:>11.2f} {row[1]:>8.2f} {row[2]:>9.2f} {row[3]:>15.2f}  {same}"
        )
    mean = [statistics.mean(r[k] for r in summary) for k in range(4)]
    print(
        f"{'all':>6} {all_stats.acceptance_rate:>7.2f} (mean over prompts) spec/plain {mean[0]:.2f} (goal >= 1.4), "
        f"spec/hf {mean[1]:.2f} (goal >= 3), plain/hf {mean[2]:.2f}, cpu spec/plain {mean[3]:.2f}"
    )


if __name__ == "__main__":
    main()
