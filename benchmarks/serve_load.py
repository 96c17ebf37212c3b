"""Load test of `longcat-lab serve`: many concurrent `openai` clients against one server, latencies and errors.

Starts the server in a child process (uvicorn, as `longcat-lab serve` runs it) over a checkpoint (`--ckpt`) or a
seeded random model of `--preset`, optionally int8-quantised, then runs `--clients` concurrent clients in this
process (`openai.AsyncOpenAI`, one task each), each sending `--requests` streamed chat completions of
`--max-tokens` tokens with its own prompt, seeded sampling. Prints, over all requests: errors, latency percentiles
(request sent to last byte, queueing included), time to first token, requests/s and generated tokens/s, the
server's own /metrics counters as a cross-check, and the same model's `generate` rate measured in the child before
serving (what the server would reach with no HTTP at all).

Run:  .venv/bin/python benchmarks/serve_load.py --ckpt runs/small --clients 32 --requests 4 --max-tokens 32
      .venv/bin/python benchmarks/serve_load.py --preset small --clients 32
      .venv/bin/python benchmarks/serve_load.py --smoke      # tiny preset, 8 clients, a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import time

import httpx
import openai
import torch

from longcat_lab.data import DataConfig, load_tokenizer
from longcat_lab.inference.generate import generate
from longcat_lab.model import presets
from longcat_lab.serve.app import create_app
from longcat_lab.serve.engine import Engine
from longcat_lab.testing import random_model

NAME = "load-test"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint or run folder (default: a random --preset model)")
    p.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    p.add_argument("--quantize", choices=("none", "int8"), default="none")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 8 clients x 2 requests of 8 tokens")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.clients, args.requests, args.max_tokens = "tiny", 8, 2, 8
    for name in ("clients", "requests", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    return args


def load(args):
    if args.ckpt:
        from longcat_lab import checkpoint

        model, tokenizer, meta = checkpoint.load(args.ckpt)
        what = f"{args.ckpt} (step {meta.get('step')})"
    else:
        model = random_model(presets.get(args.preset), 0, bias_std=0.05)
        tokenizer, what = load_tokenizer(model.config.vocab_size, DataConfig()), f"random {args.preset} model"
    if args.quantize == "int8":
        from longcat_lab.inference.quant import quantize_int8

        model = quantize_int8(model)
    return model, tokenizer, what


def serve(args, port: int, ready) -> None:
    """The child process: measure plain `generate`, then serve until terminated."""
    import uvicorn

    torch.set_num_threads(args.threads)
    model, tokenizer, what = load(args)
    prompt = torch.tensor([tokenizer.encode("Client 0, request 0: once upon a").ids])
    generate(model, prompt, 4)
    t = time.perf_counter()
    generate(model, prompt, args.max_tokens)
    ready.put((what, args.max_tokens / (time.perf_counter() - t)))
    app = create_app(Engine(model, tokenizer, NAME, max_queue=args.clients * 2))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def one_request(client, prompt: str, max_tokens: int, seed: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.8,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


def percentiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return f"p50 {q[49]:.2f} s, p90 {q[89]:.2f} s, p99 {q[98]:.2f} s, max {max(xs):.2f} s"


async def run_clients(args, url: str) -> tuple[list, float]:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)

    async def client_run(c: int) -> list[dict | str]:
        out = []
        for r in range(args.requests):
            try:
                prompt = f"Client {c}, request {r}: once upon a"
                out.append(await one_request(client, prompt, args.max_tokens, c * 1000 + r))
            except openai.OpenAIError as err:
                out.append(f"{type(err).__name__}: {err}")
        return out

    start = time.perf_counter()
    results = await asyncio.gather(*(client_run(c) for c in range(args.clients)))
    return [r for rs in results for r in rs], time.perf_counter() - start


def main() -> None:
    args = parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    child = ctx.Process(target=serve, args=(args, port, ready), daemon=True)
    child.start()
    try:
        what, direct = ready.get(timeout=600)
        root = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{root}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        total = args.clients * args.requests
        print(
            f"{what}, {args.quantize} weights: {args.clients} concurrent clients x {args.requests} streamed requests "
            f"of {args.max_tokens} tokens ({total} requests); server: FIFO queue, one sequence at a time, "
            f"{args.threads} torch thread(s), own process; torch {torch.__version__}, openai {openai.__version__}"
        )
        results, wall = asyncio.run(run_clients(args, f"{root}/v1"))
        metrics = httpx.get(f"{root}/metrics").text
    finally:
        child.terminate()
        child.join(10)
    ok = [r for r in results if isinstance(r, dict)]
    errors = [r for r in results if isinstance(r, str)]
    tokens = sum(r["tokens"] for r in ok)
    print(f"errors: {len(errors)} of {total}" + (f" (first: {errors[0]})" if errors else ""))
    if ok:
        print(f"latency: {percentiles([r['latency'] for r in ok])}")
        ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
        if ttft:
            print(f"time to first token: {percentiles(ttft)}")
    print(
        f"throughput: {len(ok) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s over {wall:.1f} s "
        f"(the same model's plain generate: {direct:.1f} tokens/s)"
    )
    keep = ("longcat_requests_total", "longcat_completion_tokens_total", "longcat_kv_cache_peak_bytes")
    print("server /metrics:", "; ".join(line for line in metrics.splitlines() if line.startswith(keep)))
    lat = statistics.median(r["latency"] for r in ok) if ok else float("nan")
    print(f"RESULT errors {len(errors)}/{total}, median latency {lat:.2f} s, {tokens / wall:.1f} tok/s served")


if __name__ == "__main__":
    main()
