"""`longcat-lab serve --ckpt RUN`: an OpenAI-compatible HTTP server for a checkpoint (or a run folder's newest),
optionally int8-quantised or compiled, batching concurrent requests, until Ctrl-C or SIGTERM, which drains it
(`serve`, docs/design.md §7.2). The server answers /health (503 while the model loads) at once."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longcat_lab import checkpoint
from longcat_lab._util import check_int, check_nonnegative
from longcat_lab.cli.arguments import add_decoding_arguments, load_decoding_model
from longcat_lab.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_STEP_TOKENS, Engine
from longcat_lab.serve.metrics import Metrics


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a checkpoint over the OpenAI chat-completions API (FastAPI)")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint folder or a run folder (its newest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model name clients send (default: --ckpt as given, as vLLM does)")
    add_decoding_arguments(p)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; one more gets 503")
    p.add_argument(
        "--max-batch",
        type=int,
        help=f"sequences decoded together per step (default {DEFAULT_MAX_BATCH}, 1 with --speculative); "
        "1: one request at a time",
    )
    p.add_argument(
        "--step-tokens",
        type=int,
        default=DEFAULT_STEP_TOKENS,
        help="token budget of one step: running sequences plus the prompts prefilled before it",
    )
    p.add_argument("--request-timeout", type=float, help="seconds from arrival after which a request ends (504)")
    p.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="seconds running requests may finish after Ctrl-C"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def run(args: argparse.Namespace) -> None:
    check_int("--port", args.port, 1)
    if args.port > 65535:
        raise ValueError(f"--port={args.port} is not allowed: it must be in [1, 65535]")
    check_int("--max-queue", args.max_queue, 1)
    if args.max_batch is not None:
        check_int("--max-batch", args.max_batch, 1)
        if args.speculative and args.max_batch != 1:
            raise ValueError(f"--max-batch={args.max_batch} is not allowed with --speculative: only 1")
    check_int("--step-tokens", args.step_tokens, 1)
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout={args.request_timeout} is not allowed: it must be > 0 seconds")
    check_nonnegative("--shutdown-grace", args.shutdown_grace)
    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    name = args.model_name if args.model_name is not None else str(args.ckpt)
    if not name.strip():
        raise ValueError(f"--model-name={name!r} is not allowed: it must be a non-empty string")
    checkpoint.resolve(args.ckpt)  # a wrong path is refused now, not after the server has started
    # The application needs fastapi and uvicorn (the `serve` extra): every other subcommand works without them.
    from longcat_lab.serve.app import create_app, run_app

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    metrics = Metrics()

    def load() -> Engine:
        model, tokenizer, meta = load_decoding_model(args)
        engine = Engine(
            model,
            tokenizer,
            name,
            metrics,
            max_queue=args.max_queue,
            speculative=args.speculative,
            max_batch=args.max_batch,
            step_tokens=args.step_tokens,
            request_timeout=args.request_timeout,
        )
        print(
            f"[longcat-lab] ready: {name!r} (step {meta.get('step')}, {args.quantize} weights"
            f"{', compiled' if args.compile else ''}, up to {engine.scheduler.max_batch} sequences per step)",
            flush=True,
        )
        return engine

    app = create_app(load=load, metrics=metrics, shutdown_grace=args.shutdown_grace)
    print(
        f"[longcat-lab] serving at http://{args.host}:{args.port}/v1 ; /health (503 until the model is loaded) and "
        "/metrics beside it; Ctrl-C drains and stops",
        flush=True,
    )
    run_app(app, args.host, args.port)


__all__ = ["add_parser", "run"]
