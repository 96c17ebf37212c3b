"""`longcat-lab train --preset P --out RUN`: pre-train a preset on the built-in data (on one process, or on N ranks
started by torchrun), then print the validation loss per domain, samples and the evaluator's table."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics

import torch.distributed as dist

import longcat_lab.data as data
from longcat_lab import checkpoint
from longcat_lab._util import check_int, check_seed
from longcat_lab.cli.arguments import check_out_dir
from longcat_lab.eval.suite import evaluate_checkpoint, format_table
from longcat_lab.model import presets
from longcat_lab.parallel.launch import RDZV_TIMEOUT_S, check_endpoint, check_nnodes, die_with_parent, torchrun
from longcat_lab.parallel.mesh import in_torchrun, restart_count
from longcat_lab.train import TrainingError, apply_overrides, sample_text, train, train_preset
from longcat_lab.train.distributed import train_distributed
from longcat_lab.train.trainer import check_runtime

PRESETS = ("tiny", "mini", "ablation", "small", "base")
# Flags that only the launching process reads; torchrun's workers get the command without them.
LAUNCH_FLAGS = ("--nproc", "--max-restarts", "--nnodes", "--rdzv-endpoint", "--rdzv-id", "--rdzv-timeout")


def add_parser(subparsers) -> argparse.ArgumentParser:
    tr = subparsers.add_parser(
        "train", help="train a preset on the built-in data (Shakespeare, Python source, reasoning)"
    )
    tr.add_argument("--preset", choices=PRESETS, default="small")
    tr.add_argument("--out", required=True, help="run folder: metrics.jsonl and checkpoints/ (one writer at a time)")
    tr.add_argument("--steps", type=int, help="total optimizer steps (stages are rescaled)")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out (a fresh start when there is none)",
    )
    tr.add_argument("--seed", type=int, help="seed for init and data order")
    tr.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a ModelConfig/TrainConfig/DataConfig/ControllerConfig/LossConfig field by name, "
        "e.g. --set bias_controller=pid --set target_ffn_experts=2 (repeatable)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    tr.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N ranks per node, started by torchrun's elastic agent (gloo on CPU, NCCL on GPUs); "
        "--set batch_size is the global batch, split evenly over the ranks",
    )
    tr.add_argument("--ep", type=int, default=1, metavar="E", help="ranks that share the FFN experts (divides N)")
    tr.add_argument("--max-restarts", type=int, default=0, help="with --nproc: restarts after a rank dies")
    tr.add_argument("--nnodes", default="1", help="with --nproc: nodes (or MIN:MAX), all given this command")
    tr.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT", help="with --nnodes > 1: rendezvous")
    tr.add_argument("--rdzv-id", default="longcat", help="with --nnodes > 1: one id per job")
    tr.add_argument(
        "--rdzv-timeout",
        type=int,
        default=RDZV_TIMEOUT_S,
        metavar="S",
        help="with --nnodes > 1: seconds to wait for the rendezvous (joining it, and each answer from it)",
    )
    tr.add_argument(
        "--samples",
        type=int,
        default=60,
        metavar="N",
        help="after training, print one N-token sample per domain (0: none)",
    )
    tr.add_argument(
        "--eval",
        choices=("auto", "full", "cheap", "none"),
        default="auto",
        help="evaluator table at the end (longcat-lab eval); auto: full, cheap for the tiny preset",
    )
    return tr


def report_samples(model, tokenizer, val_texts: dict[str, list[str]], max_new_tokens: int, seed: int) -> list[str]:
    """One sample per domain, prompted with the start of that domain's first validation document (text, code and
    a reasoning problem up to its first step), so samples show what the model learned from each corpus."""
    out = []
    for domain, texts in val_texts.items():
        doc = texts[0]
        if domain == "reasoning":
            prompt = doc[: doc.index("Step 1:") + len("Step 1:")] if "Step 1:" in doc else doc[:80]
        else:
            prompt = doc[: doc.rfind("\n", 0, 120) + 1] or doc[:80]
        room = model.config.max_position_embeddings - len(tokenizer.encode(prompt).ids)
        new = min(max_new_tokens, room)  # the report's own prompt must not make a valid --samples fail
        text = sample_text(model, tokenizer, prompt, max_new_tokens=new, temperature=0.8, seed=seed)
        out.append(f"--- {domain} (prompt: {len(prompt)} chars) ---\n{text}")
    return out


def worker_argv(argv: list[str]) -> list[str]:
    """The `train` command line without the launcher's flags (each given as `--flag value` or `--flag=value`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(a)
    return out


def check_arguments(args: argparse.Namespace, worker: bool) -> None:
    """Every argument that can be checked alone, before any work starts."""
    if args.steps is not None:
        check_int("--steps", args.steps)
    check_int("--ep", args.ep)
    if args.nproc is None and not worker and args.ep != 1:
        raise ValueError(f"--ep={args.ep} is not allowed on one process: add --nproc N (N a multiple of {args.ep})")
    if args.nproc is not None:
        check_int("--nproc", args.nproc)
        check_int("--max-restarts", args.max_restarts, 0)
        check_int("--rdzv-timeout", args.rdzv_timeout)
        check_nnodes(args.nnodes)
        if args.nnodes not in ("1", "1:1"):
            check_endpoint(args.rdzv_endpoint)
        if not worker and args.nnodes in ("1", "1:1") and args.nproc % args.ep:
            raise ValueError(f"--ep={args.ep} is not allowed with --nproc={args.nproc}: it must divide the ranks")
    check_int("--samples", args.samples, 0)
    if args.seed is not None:
        check_seed("--seed", args.seed)


def launch(args: argparse.Namespace, batch_size: int) -> None:
    """Start `args.nproc` ranks per node with torchrun, each running this command without the launcher's flags."""
    # torch.distributed's elastic extras load only when a launch is asked for.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    if args.nnodes in ("1", "1:1") and batch_size % args.nproc:
        raise ValueError(
            f"batch_size={batch_size} is not allowed with --nproc={args.nproc}: the global batch "
            f"must split evenly over the ranks (set --set batch_size=B, B a multiple of {args.nproc})"
        )
    print(f"[longcat-lab] starting {args.nproc} ranks per node with torchrun", flush=True)
    os.environ["LONGCAT_LAUNCHER_PID"] = str(os.getpid())  # the ranks' parent: they end when it does
    try:
        torchrun(
            worker_argv(args.argv),
            args.nproc,
            args.max_restarts,
            args.nnodes,
            args.rdzv_endpoint,
            args.rdzv_id,
            args.rdzv_timeout,
        )
    except RendezvousError as err:
        raise TrainingError(
            f"--rdzv-endpoint={args.rdzv_endpoint!r}: no rendezvous within --rdzv-timeout={args.rdzv_timeout} s "
            f"({type(err).__name__}); check that HOST:PORT is the first node's free port and every node is started"
        ) from None
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise TrainingError(
            f"training on {args.nproc} ranks failed: rank {rank} exited with code {failure.exitcode} "
            f"after {args.max_restarts} restart(s) (--max-restarts); its error is printed above"
        ) from None


def run(args: argparse.Namespace) -> None:
    worker = in_torchrun()
    if worker:  # a rank ends with its launcher: an orphan would train on, writing checkpoints and holding the lock
        die_with_parent(int(os.environ.get("LONGCAT_LAUNCHER_PID", os.getppid())))
    check_arguments(args, worker)
    args.out = check_out_dir(args.out)
    model_config = presets.get(args.preset)
    train_config = train_preset(args.preset)
    if args.steps is not None:
        train_config = train_config.with_steps(args.steps)
    sets = list(args.set or [])
    if args.seed is not None:
        sets.append(f"train.seed={args.seed}")
    model_config, train_config = apply_overrides(model_config, train_config, sets)
    check_runtime(train_config)
    if args.samples >= model_config.max_position_embeddings:
        raise ValueError(
            f"--samples={args.samples} is not allowed: it must be below max_position_embeddings="
            f"{model_config.max_position_embeddings}"
        )
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.nproc is not None and not worker:
        launch(args, train_config.batch_size)
        return
    if main_rank:
        print(
            f"[longcat-lab] training preset {args.preset!r} ({train_config.total_steps} steps) into {args.out}"
            f"{' (resuming if a checkpoint exists)' if args.resume else ''}",
            flush=True,
        )
    if worker:
        # After a rank died, torchrun's agent starts the group again: continue from the newest checkpoint.
        resume = args.resume or restart_count() > 0
        result = train_distributed(
            model_config, train_config, args.out, args.ep, resume=resume, progress=not args.no_progress
        )
        dist.destroy_process_group()
        if not main_rank:
            return
        # The ranks held expert shards: the report samples from the whole model of the last checkpoint.
        result = dataclasses.replace(result, model=checkpoint.load(result.checkpoint)[0])
    else:
        result = train(model_config, train_config, args.out, resume=args.resume, progress=not args.no_progress)
    report(args, result, model_config, train_config)


def _median(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(values) if values else None


def report_card(rows: list[dict], val_loss: dict[str, float], unigram: dict[str, float]) -> list[str]:
    """The run's report card from its metrics rows: per domain the validation loss and bits per byte next to the
    unigram baseline's, then wall time, tokens/s and MFU (medians over the steps), FFN experts per token (mean
    over the last quarter of steps) against the target."""
    train = [r for r in rows if r.get("kind") == "train"]
    bpb = next((r for r in reversed(rows) if r.get("kind") == "eval_bpb"), {})
    lines = [
        "report card: validation loss per domain and bits per byte (unigram baseline of the same data in brackets):",
        f"  {'domain':12s} {'val loss (nats/token)':>24s} {'bits per byte':>22s}",
    ]
    for domain, loss in val_loss.items():
        b, ub = bpb.get("bits_per_byte", {}).get(domain), bpb.get("unigram_bits_per_byte", {}).get(domain)
        bits = "-" if b is None else f"{b:.4f} [{ub:.4f}]" if ub is not None else f"{b:.4f}"
        lines.append(f"  {domain:12s} {f'{loss:.4f} [{unigram[domain]:.4f}]':>24s} {bits:>22s}")
    if train:
        tps, mfu = _median([r.get("tokens_per_s") for r in train]), _median([r.get("mfu") for r in train])
        tail = [r.get("ffn_experts_per_token") for r in train[len(train) * 3 // 4 :]]
        tail = [v for v in tail if v is not None]
        target = train[-1].get("target_ffn_experts")
        lines.append(
            f"  time {train[-1].get('time_s', 0):.0f} s in this run, {train[-1].get('tokens_seen', 0):,} tokens; "
            f"{'-' if tps is None else f'{tps:,.0f}'} tokens/s, MFU {'-' if mfu is None else f'{mfu:.3f}'} (medians)"
        )
        if tail:
            lines.append(
                f"  FFN experts per token {sum(tail) / len(tail):.3f} (last quarter)"
                + ("" if target is None else f" against the target {target:.3f}")
            )
    return lines


def report(args: argparse.Namespace, result, model_config, train_config) -> None:
    """The report card (validation loss and bits per byte per domain next to the unigram baseline, time,
    throughput, MFU, FFN experts per token), samples, and the evaluator's table."""
    if result.resumed_from == result.step:
        print(f"[longcat-lab] {args.out} had already reached step {result.step}: nothing to train")
    print(f"[longcat-lab] step {result.step}, checkpoint {result.checkpoint}")
    unigram = {
        d: data.unigram_baseline(result.dataset.train[d], result.dataset.val[d], model_config.vocab_size)
        for d in result.val_loss
    }
    print("\n".join(report_card(result.rows(), result.val_loss, unigram)))
    if args.samples:
        val_texts = {d: [doc.text for doc in docs] for d, docs in data.corpora(train_config.data).val.items()}
        for block in report_samples(result.model, result.tokenizer, val_texts, args.samples, train_config.seed):
            print(block)
    level = ("cheap" if args.preset == "tiny" else "full") if args.eval == "auto" else args.eval
    if level != "none":
        evaluation, path = evaluate_checkpoint(result.checkpoint, level)
        print(f"[longcat-lab] evaluator ({level}, {evaluation['seconds']:.0f} s; written to {path}):")
        print(format_table(evaluation))


__all__ = ["LAUNCH_FLAGS", "add_parser", "report_card", "report_samples", "run", "worker_argv"]
