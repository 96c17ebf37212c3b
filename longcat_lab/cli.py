"""The `longcat-lab` command line. `longcat-lab --help` lists the subcommands."""

from __future__ import annotations

import argparse
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
    for path in paths:
        print(f"[longcat-lab] executing {path.name} (smoke={smoke}) -> {out / path.name}", flush=True)
        papermill.execute_notebook(
            str(path),
            str(out / path.name),
            kernel_name="python3",
            parameters={"smoke": smoke},
            cwd=str(root),
            progress_bar=False,
        )


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
        text = sample_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=seed)
        out.append(f"--- {domain} (prompt: {len(prompt)} chars) ---\n{text}")
    return out


def run_train(args) -> None:
    import longcat_lab.data as data
    from longcat_lab.model import presets
    from longcat_lab.train import apply_overrides, train, train_preset

    model_config = presets.get(args.preset)
    train_config = train_preset(args.preset)
    if args.steps is not None:
        train_config = train_config.with_steps(args.steps)
    sets = list(args.set or [])
    if args.seed is not None:
        sets.append(f"train.seed={args.seed}")
    model_config, train_config = apply_overrides(model_config, train_config, sets)
    print(
        f"[longcat-lab] training preset {args.preset!r} ({train_config.total_steps} steps) into {args.out}"
        f"{' (resuming if a checkpoint exists)' if args.resume else ''}",
        flush=True,
    )
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


def run_sample(args) -> None:
    from longcat_lab.train import checkpoint, sample_text

    model, tokenizer, meta = checkpoint.load(args.ckpt)
    print(
        sample_text(
            model,
            tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longcat-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a preset on the built-in data (Shakespeare, Python source, reasoning)")
    tr.add_argument("--preset", choices=("tiny", "small", "base"), default="small")
    tr.add_argument("--out", type=Path, required=True, help="run folder: metrics.jsonl and checkpoints/")
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
        "--samples",
        type=int,
        default=60,
        metavar="N",
        help="after training, print one N-token sample per domain (0: none)",
    )
    sa = sub.add_parser("sample", help="sample text from a checkpoint (or the newest one of a run folder)")
    sa.add_argument("--ckpt", type=Path, required=True)
    sa.add_argument("--prompt", required=True)
    sa.add_argument("--max-new-tokens", type=int, default=100)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top-p", type=float, default=0.95)
    sa.add_argument("--seed", type=int, default=0)
    nb = sub.add_parser("notebooks", help="execute the numbered notebooks with papermill")
    nb.add_argument("--out", type=Path, default=Path("build/notebooks"), help="folder for the executed copies")
    nb.add_argument("--smoke", action="store_true", help="run each notebook's fast smoke configuration")
    nb.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 03")
    args = parser.parse_args(argv)
    if args.command == "notebooks":
        run_notebooks(args.out, args.smoke, args.only)
    elif args.command in ("train", "sample"):
        from longcat_lab.train import TrainingError
        from longcat_lab.train.checkpoint import CheckpointError

        try:
            (run_train if args.command == "train" else run_sample)(args)
        except (ValueError, TrainingError, CheckpointError) as err:
            # One line naming the field, value or file; tracebacks are for bugs, not for bad input.
            print(f"longcat-lab {args.command}: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
