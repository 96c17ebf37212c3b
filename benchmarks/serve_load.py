"""Load test of `longcat-lab serve`: the continuous-batching engine against one request at a time (`--max-batch
1`), side by side in one run, under 1, 8 and 32 concurrent streamed clients.

For each policy a server starts in a child process (uvicorn, as `longcat-lab serve` runs it) over the same
checkpoint (`--ckpt`) or the same seeded random model of `--preset`; then, for each client count, that many
`openai.AsyncOpenAI` clients in this process (one task each) send streamed chat completions of `--max-tokens`
tokens one after another, each with its own prompt and seed (temperature 0.8). Every `--disconnect-every`-th
request is dropped by its client after its second text chunk, so the server must free rows mid-stream. Prints per
policy and client count: errors, latency percentiles (request sent to last byte, queueing included), time to first
token, requests/s and generated tokens/s (each client count runs the policies in the order A B B A, half the
requests each time, so that a drift in a shared machine's load falls on both alike); then the ratios the serving
goals ask for, and each child's plain `generate` rate measured before serving (one sequence with no HTTP at all).

Run:  .venv/bin/python benchmarks/serve_load.py --ckpt runs/small --max-tokens 32
      .venv/bin/python benchmarks/serve_load.py --preset small           # a seeded random model
      .venv/bin/python benchmarks/serve_load.py --smoke                  # tiny preset, a few seconds
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
from longcat_lab.serve.app import create_app, run_app
from longcat_lab.serve.engine import DEFAULT_MAX_BATCH, Engine
from longcat_lab.testing import random_model

NAME = "load-test"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint or run folder (default: a random --preset model)")
    p.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    p.add_argument("--quantize", choices=("none", "int8"), default="none")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent client counts to run")
    p.add_argument(
        "--requests", type=int, default=128, help="requests per policy and client count, spread over the clients"
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="the batched policy's --max-batch")
    p.add_argument("--disconnect-every", type=int, default=8, help="every n-th request disconnects mid-stream")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 1 and 4 clients, 16 requests of 8 tokens")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.clients, args.requests, args.max_tokens = "tiny", [1, 4], 16, 8
    for name in ("requests", "max_tokens", "max_batch", "disconnect_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1")
    if min(args.clients) < 1:
        p.error(f"--clients={args.clients} is not allowed: each must be >= 1")
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


def serve(args, max_batch: int, port: int, ready) -> None:
    """The child process: measure plain `generate`, then serve with `max_batch` until terminated."""
    torch.set_num_threads(args.threads)
    model, tokenizer, what = load(args)
    prompt = torch.tensor([tokenizer.encode("Client 0, request 0: once upon a").ids])
    generate(model, prompt, 4)
    t = time.perf_counter()
    generate(model, prompt, args.max_tokens)
    ready.put((what, args.max_tokens / (time.perf_counter() - t)))
    engine = Engine(model, tokenizer, NAME, max_queue=4 * max(args.clients) + 8, max_batch=max_batch)
    run_app(create_app(engine, shutdown_grace=0), "127.0.0.1", port, log_level="warning")


async def one_request(client, prompt: str, args, seed: int, disconnect: bool) -> dict:
    start = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    stream = await client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=args.max_tokens,
        temperature=0.8,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter() - start
            if disconnect and chunks >= 2:
                await stream.close()  # the client goes away mid-stream
                return {"disconnected": True}
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def run_clients(args, url: str, clients: int) -> tuple[list, float]:
    """`args.requests` requests (at least one per client) over `clients` concurrent clients."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    per_client = max(1, args.requests // clients)

    async def client_run(c: int) -> list[dict | str]:
        out = []
        for r in range(per_client):
            n = c * per_client + r
            try:
                prompt = f"Client {c}, request {r}: " + "once upon a time " * (n % 5)  # prompts of several lengths
                out.append(await one_request(client, prompt, args, n, n % args.disconnect_every == 1))
            except openai.OpenAIError as err:
                out.append(f"{type(err).__name__}: {err}")
        return out

    start = time.perf_counter()
    results = await asyncio.gather(*(client_run(c) for c in range(clients)))
    await client.close()
    return [r for rs in results for r in rs], time.perf_counter() - start


def percentile(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


class Child:
    """A server with `max_batch` in a child process: `root` once it is ready, `direct` its plain generate rate."""

    def __init__(self, args, max_batch: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        self.ready = ctx.Queue()
        self.process = ctx.Process(target=serve, args=(args, max_batch, port, self.ready), daemon=True)
        self.process.start()
        self.root = f"http://127.0.0.1:{port}"

    def wait(self) -> None:
        self.what, self.direct = self.ready.get(timeout=900)
        for _ in range(600):
            try:
                if httpx.get(f"{self.root}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def measure(args, child: Child, clients: int, halves: list) -> None:
    """Run half of `args.requests` over `clients` clients against `child`; append (results, wall) to `halves`."""
    half = argparse.Namespace(**{**vars(args), "requests": max(1, args.requests // 2)})
    halves.append(asyncio.run(run_clients(half, f"{child.root}/v1", clients)))


def summary(halves: list) -> dict:
    results = [r for rs, _ in halves for r in rs]
    wall = sum(w for _, w in halves)
    ok = [r for r in results if isinstance(r, dict) and not r.get("disconnected")]
    return {
        "requests": len(results),
        "errors": [r for r in results if isinstance(r, str)],
        "disconnected": sum(1 for r in results if isinstance(r, dict) and r.get("disconnected")),
        "latency": [r["latency"] for r in ok],
        "ttft": [r["ttft"] for r in ok if r["ttft"] is not None],
        "tok_s": sum(r["tokens"] for r in ok) / wall,
        "req_s": len(ok) / wall,
    }


def main() -> None:
    args = parse_args()
    policies = {f"batched (--max-batch {args.max_batch})": args.max_batch, "one at a time (--max-batch 1)": 1}
    children = {name: Child(args, max_batch) for name, max_batch in policies.items()}
    rows: dict[str, dict] = {name: {} for name in policies}
    try:
        for child in children.values():
            child.wait()
            asyncio.run(run_clients(args, f"{child.root}/v1", 1))  # warm-up: builds the decoding weights
        # Each client count in the order A B B A (half the requests each time), so that a drift in the machine's
        # load falls on both policies alike.
        (a, child_a), (b, child_b) = children.items()
        for clients in args.clients:
            halves = {a: [], b: []}
            for name, child in ((a, child_a), (b, child_b), (b, child_b), (a, child_a)):
                measure(args, child, clients, halves[name])
            for name in policies:
                rows[name][clients] = summary(halves[name])
        batched_metrics = httpx.get(f"{next(iter(children.values())).root}/metrics").text
    finally:
        for child in children.values():
            child.stop()
    what = next(iter(children.values())).what
    print(
        f"{what}, {args.quantize} weights; streamed requests of up to {args.max_tokens} tokens, every "
        f"{args.disconnect_every}-th dropped by its client mid-stream; server {args.threads} torch thread(s), own "
        f"process; torch {torch.__version__}, openai {openai.__version__}"
    )
    columns = ("policy", "clients", "requests (dropped)", "errors", "latency p50 / p99", "first token p50 / p99")
    print("| " + " | ".join((*columns, "tok/s", "req/s")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    total = errors = 0
    for name in policies:
        for clients in args.clients:
            r = rows[name][clients]
            total += r["requests"]
            errors += len(r["errors"])
            lat, ttft = r["latency"], r["ttft"]
            print(
                f"| {name} | {clients} | {r['requests']} ({r['disconnected']}) | {len(r['errors'])} | "
                f"{percentile(lat, 50):.2f} / {percentile(lat, 99):.2f} s | "
                f"{percentile(ttft, 50):.2f} / {percentile(ttft, 99):.2f} s | {r['tok_s']:.1f} | {r['req_s']:.2f} |"
            )
            if r["errors"]:
                print(f"  first error: {r['errors'][0]}")
    batched, single = rows.values()
    print("plain generate in each child:", ", ".join(f"{c.direct:.1f}" for c in children.values()), "tokens/s")
    for clients in args.clients:
        b, s = batched[clients], single[clients]
        print(
            f"RESULT {clients} clients: batched/one-at-a-time tok/s {b['tok_s'] / s['tok_s']:.2f}x, p50 latency "
            f"{statistics.median(b['latency']) / statistics.median(s['latency']):.2f}x, p50 first token "
            f"{statistics.median(b['ttft']) / statistics.median(s['ttft']):.2f}x"
        )
    keep = ("longcat_step_batch_size_sum", "longcat_step_batch_size_count", "longcat_request_timeouts_total")
    print("batched server /metrics:", "; ".join(x for x in batched_metrics.splitlines() if x.startswith(keep)))
    print(f"RESULT errors {errors} of {total} requests")


if __name__ == "__main__":
    main()
