"""The `longcat-lab` command line. `longcat-lab --help` lists the subcommands."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path


def run_notebooks(out: Path, smoke: bool, only: list[str] | None = None) -> None:
    """Execute the numbered notebooks with papermill into `out` (kernel python3), stopping at the first failure."""
    import papermill

    root = Path(__file__).resolve().parent.parent / "notebooks"
    paths = sorted(root.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    if not paths:
        raise SystemExit(f"no notebooks found under {root}")
    out.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(paths, 1):
        print(f"[longcat-lab] {n}/{len(paths)} {path.name} (smoke={smoke})", flush=True)
        papermill.execute_notebook(  # its progress bar counts the cells
            str(path),
            str(out / path.name),
            kernel_name="python3",
            parameters={"smoke": smoke},
            cwd=str(root),
            progress_bar=True,
        )
    print(f"[longcat-lab] executed {len(paths)} notebooks into {out.resolve()}: open them with `jupyter lab {out}`")


# train and sample ------------------------------------------------------------------------------------------------
def report_samples(model, tokenizer, val_texts: dict[str, list[str]], max_new_tokens: int, seed: int) -> list[str]:
    """One sample per domain, prompted with the start of that domain's first validation document (text, code and
    a reasoning problem up to its first step), so samples show what the model learned from each corpus."""
    from longcat_lab.train import sample_text

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


def check_out_dir(out: str) -> Path:
    """`--out` as a Path, refused (one line) unless a run folder can be made or written there: checked before any
    work, so that a bad path never costs a training run."""
    if not out.strip():
        raise ValueError(f"--out={out!r} is not allowed: it must name a run folder, e.g. --out runs/tiny")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out={out!r} is not allowed: it is a file; choose a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest part of the path that exists
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out={out!r} is not allowed: {probe} is a file, so no folder can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out={out!r} is not allowed: {probe} is not writable; choose a folder you may write to")
    return path


# Flags that only the launching process reads; torchrun's workers get the command without them.
LAUNCH_FLAGS = ("--nproc", "--max-restarts", "--nnodes", "--rdzv-endpoint", "--rdzv-id")


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


def run_train(args) -> None:
    import longcat_lab.data as data
    from longcat_lab._util import check_int, check_seed
    from longcat_lab.model import presets
    from longcat_lab.parallel.mesh import in_torchrun, restart_count
    from longcat_lab.train import TrainingError, apply_overrides, train, train_preset
    from longcat_lab.train.trainer import check_runtime

    # Every argument is checked before any work starts.
    if args.steps is not None:
        check_int("--steps", args.steps)
    check_int("--ep", args.ep)
    worker = in_torchrun()
    if args.nproc is None and not worker and args.ep != 1:
        raise ValueError(f"--ep={args.ep} is not allowed on one process: add --nproc N (N a multiple of {args.ep})")
    if args.nproc is not None:
        check_int("--nproc", args.nproc)
        check_int("--max-restarts", args.max_restarts, 0)
        if not worker and args.nnodes in ("1", "1:1") and args.nproc % args.ep:
            raise ValueError(f"--ep={args.ep} is not allowed with --nproc={args.nproc}: it must divide the ranks")
    check_int("--samples", args.samples, 0)
    if args.seed is not None:
        check_seed("--seed", args.seed)
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
        if args.nnodes in ("1", "1:1") and train_config.batch_size % args.nproc:
            raise ValueError(
                f"batch_size={train_config.batch_size} is not allowed with --nproc={args.nproc}: the global batch "
                f"must split evenly over the ranks (set --set batch_size=B, B a multiple of {args.nproc})"
            )
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        from longcat_lab.parallel.launch import torchrun

        print(f"[longcat-lab] starting {args.nproc} ranks per node with torchrun", flush=True)
        try:
            torchrun(
                worker_argv(args.argv), args.nproc, args.max_restarts, args.nnodes, args.rdzv_endpoint, args.rdzv_id
            )
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            raise TrainingError(
                f"training on {args.nproc} ranks failed: rank {rank} exited with code {failure.exitcode} "
                f"after {args.max_restarts} restart(s) (--max-restarts); its error is printed above"
            ) from None
        return
    if main_rank:
        print(
            f"[longcat-lab] training preset {args.preset!r} ({train_config.total_steps} steps) into {args.out}"
            f"{' (resuming if a checkpoint exists)' if args.resume else ''}",
            flush=True,
        )
    if worker:
        import dataclasses

        import torch.distributed as dist

        from longcat_lab import checkpoint
        from longcat_lab.train.distributed import train_distributed

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
    if result.resumed_from == result.step:
        print(f"[longcat-lab] {args.out} had already reached step {result.step}: nothing to train")
    print(f"[longcat-lab] step {result.step}, checkpoint {result.checkpoint}")
    print("validation loss per domain (nats/token; unigram baseline of the same data in brackets):")
    for domain, loss in result.val_loss.items():
        base = data.unigram_baseline(result.dataset.train[domain], result.dataset.val[domain], model_config.vocab_size)
        print(f"  {domain:12s} {loss:.4f}  [{base:.4f}]")
    if args.samples:
        val_texts = {d: [doc.text for doc in docs] for d, docs in data.corpora(train_config.data).val.items()}
        for block in report_samples(result.model, result.tokenizer, val_texts, args.samples, train_config.seed):
            print(block)
    level = ("cheap" if args.preset == "tiny" else "full") if args.eval == "auto" else args.eval
    if level != "none":
        from longcat_lab.eval.suite import evaluate_checkpoint, format_table

        report, path = evaluate_checkpoint(result.checkpoint, level)
        print(f"[longcat-lab] evaluator ({level}, {report['seconds']:.0f} s; written to {path}):")
        print(format_table(report))


def run_sample(args) -> None:
    from longcat_lab._util import check_int, check_nonnegative, check_seed
    from longcat_lab.inference.options import load_for_decoding
    from longcat_lab.train import sample_text

    check_int("--max-new-tokens", args.max_new_tokens, 0)
    check_nonnegative("--temperature", args.temperature)
    if not (0 < args.top_p <= 1):
        raise ValueError(f"--top-p={args.top_p!r} is not allowed: it must be in (0, 1]")
    check_seed("--seed", args.seed)
    if not args.prompt:
        raise ValueError("--prompt='' is not allowed: it must be a non-empty string")
    model, tokenizer, meta = load_for_decoding(args)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if not args.speculative:
        print(sample_text(model, tokenizer, args.prompt, seed=args.seed, **options))
        return
    import torch

    from longcat_lab.inference.speculative import speculative_generate

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


# Where an OSError of each command most likely points; the one-line message names it.
_OS_ERROR_ARGUMENT = {"train": "--out", "sft": "--out", "sweep": "--out", "synth": "--out"}


def run_command(args, runner) -> int:
    """Run one subcommand; bad input (a field, a value, a file) becomes one line on stderr and exit code 2, since
    tracebacks are for bugs, not for bad input."""
    from longcat_lab._util import os_error_line
    from longcat_lab.checkpoint import CheckpointError
    from longcat_lab.train import TrainingError

    try:
        runner(args)
    except (ValueError, TrainingError, CheckpointError) as err:
        line = str(err)
    except OSError as err:  # a full disk, a read-only place, a file where a folder should be
        line = os_error_line(err, _OS_ERROR_ARGUMENT.get(args.command, "--ckpt"))
        if args.command in ("train", "sft") and err.errno in (errno.ENOSPC, errno.EDQUOT):
            line += " with --resume (the checkpoints already written are kept)"
    else:
        return 0
    print(f"longcat-lab {args.command}: error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longcat-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a preset on the built-in data (Shakespeare, Python source, reasoning)")
    tr.add_argument("--preset", choices=("tiny", "mini", "small", "base"), default="small")
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
    sa = sub.add_parser("sample", help="sample text from a checkpoint (or the newest one of a run folder)")
    sa.add_argument("--ckpt", type=Path, required=True)
    sa.add_argument("--prompt", required=True)
    sa.add_argument("--max-new-tokens", type=int, default=100)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top-p", type=float, default=0.95)
    sa.add_argument("--seed", type=int, default=0)
    from longcat_lab.inference.options import add_decoding_arguments

    add_decoding_arguments(sa)
    from longcat_lab.agent import chat as chat_cli
    from longcat_lab.eval import cli as eval_cli
    from longcat_lab.experiments import cli as sweep_cli
    from longcat_lab.serve import cli as serve_cli
    from longcat_lab.synth import cli as synth_cli
    from longcat_lab.train import sft_cli

    eval_cli.add_parser(sub)
    sft_cli.add_parser(sub)
    sweep_cli.add_parser(sub)
    synth_cli.add_parser(sub)
    chat_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    nb = sub.add_parser("notebooks", help="execute the numbered notebooks with papermill")
    nb.add_argument("--out", type=Path, default=Path("build/notebooks"), help="folder for the executed copies")
    nb.add_argument("--smoke", action="store_true", help="run each notebook's fast smoke configuration")
    nb.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 03")
    fg = sub.add_parser("figures", help="render the README's figures to PNG (plotly static export, system Chromium)")
    fg.add_argument("--out", type=Path, default=Path("docs/figures"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # torchrun's workers get the same command
    if args.command == "notebooks":
        run_notebooks(args.out, args.smoke, args.only)
    elif args.command == "figures":
        from longcat_lab.viz.gallery import render

        print(*(f"[longcat-lab] wrote {p}" for p in render(args.out)), sep="\n")
    else:
        return run_command(
            args,
            {
                "train": run_train,
                "sample": run_sample,
                "sft": sft_cli.run,
                "eval": eval_cli.run,
                "sweep": sweep_cli.run,
                "synth": synth_cli.run,
                "chat": chat_cli.run,
                "serve": serve_cli.run,
            }[args.command],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
