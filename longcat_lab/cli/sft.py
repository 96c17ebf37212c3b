"""`longcat-lab sft --init-from RUN_OR_CKPT --data FILE.jsonl --out DIR [--steps N] [--resume] [--set ...]`:
fine-tune a checkpoint on `longcat-lab synth` dialogues (`train.sft`, docs/design.md §5.4), then print the
held-out dialogue loss and the pre-training validation loss before and after, which show the gain and any
forgetting."""

from __future__ import annotations

import argparse
from pathlib import Path

from longcat_lab.cli.arguments import check_out_dir
from longcat_lab.train.sft import LR, STEPS, cleanup_on_refusal, prepare, train_sft
from longcat_lab.train.trainer import check_runtime


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sft", help="fine-tune a checkpoint on synthesised tool-use dialogues")
    p.add_argument("--init-from", required=True, help="the checkpoint to start from, or a run folder (its newest)")
    p.add_argument("--data", type=Path, required=True, help="a JSONL of `longcat-lab synth` records")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/ and a copy of the data")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {STEPS})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {LR})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a TrainConfig field (or another config's) by name, e.g. --set sft_pretrain_ratio=0.125",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def run(args: argparse.Namespace) -> None:
    out = check_out_dir(args.out)
    extra = {"lr": args.lr} if args.lr is not None else {}
    with cleanup_on_refusal(out):
        model_config, cfg = prepare(args.init_from, args.data, out, args.steps, args.set or (), **extra)
        check_runtime(cfg)
        result = _train(args, model_config, cfg, out)
    _report(result)


def _train(args: argparse.Namespace, model_config, cfg, out: Path):
    print(
        f"[longcat-lab] fine-tuning {cfg.init_from} on {args.data} ({cfg.total_steps} steps of {cfg.grad_accum} x "
        f"{cfg.batch_size} x {cfg.stages[0].seq_len} tokens, pre-training rows {cfg.sft_pretrain_ratio:g}) into {out}"
        f"{' (resuming if a checkpoint exists)' if args.resume else ''}",
        flush=True,
    )
    return train_sft(model_config, cfg, out, resume=args.resume, progress=not args.no_progress)


def _report(result) -> None:
    print(f"[longcat-lab] step {result.step}, checkpoint {result.checkpoint}")
    sft_rows = result.rows("eval_sft")
    evals = result.rows("eval")
    if sft_rows:
        first, last = sft_rows[0], sft_rows[-1]
        print(
            f"held-out dialogues: loss per assistant token {first['sft_val_loss']:.4f} (step {first['step']}) -> "
            f"{last['sft_val_loss']:.4f} (step {last['step']})"
        )
    if len(evals) >= 2:
        print("pre-training validation loss per domain (forgetting), first evaluation -> last:")
        before, after = evals[0], evals[-1]
        for domain, loss in after["val_loss"].items():
            print(f"  {domain:12s} {before['val_loss'][domain]:.4f} -> {loss:.4f}")


__all__ = ["add_parser", "run"]
