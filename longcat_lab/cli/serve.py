"""`longcat-lab serve --ckpt RUN`: an OpenAI-compatible HTTP server for a checkpoint (or a run folder's newest),
optionally int8-quantised or compiled, until Ctrl-C (`serve`, docs/design.md §7.2)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longcat_lab._util import check_int
from longcat_lab.cli.arguments import add_decoding_arguments, load_decoding_model
from longcat_lab.serve.engine import Engine


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a checkpoint over the OpenAI chat-completions API (FastAPI)")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint folder or a run folder (its newest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model name clients send (default: --ckpt as given, as vLLM does)")
    add_decoding_arguments(p)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; one more gets 503")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def run(args: argparse.Namespace) -> None:
    check_int("--port", args.port, 1)
    if args.port > 65535:
        raise ValueError(f"--port={args.port} is not allowed: it must be in [1, 65535]")
    check_int("--max-queue", args.max_queue, 1)
    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    name = args.model_name if args.model_name is not None else str(args.ckpt)
    if not name.strip():
        raise ValueError(f"--model-name={name!r} is not allowed: it must be a non-empty string")
    # The application needs fastapi and uvicorn (the `serve` extra): every other subcommand works without them.
    from longcat_lab.serve.app import create_app, run_app

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer, meta = load_decoding_model(args)
    app = create_app(Engine(model, tokenizer, name, max_queue=args.max_queue, speculative=args.speculative))
    print(
        f"[longcat-lab] serving {name!r} (step {meta.get('step')}, {args.quantize} weights"
        f"{', compiled' if args.compile else ''}) at "
        f"http://{args.host}:{args.port}/v1 ; /health and /metrics beside it; Ctrl-C stops",
        flush=True,
    )
    run_app(app, args.host, args.port)


__all__ = ["add_parser", "run"]
