"""Structured decoding's cost per token (docs/design.md §5.2): the tool-call mask against a plain decoding step, at
batch 1, side by side in one run.

A seeded random model of `--preset` (default small) and a BPE tokenizer of its vocabulary size trained on the
project's corpora (a small sample, cached) decode greedily inside a tool call: the prompt ends with the open marker,
and the tokens of one constrained greedy run (a `ToolCallConstraint` for all the bank and shop tools, more than any
agent is offered) are decoded again twice, forced through `stream`'s constraint hook: once plain, once through the
tool-call constraint as well, so that both runs make the model do the same work. The runs alternate, and each keeps
its best of `--repeats`. Separately, the expert's own calls from a few tasks are fed token by token through a constraint
(`mask` on a logits row, then `advance`), which times the grammar's work on the text a trained model writes; the
random model's output is arbitrary, so it times the work on a worse case (long strings of odd bytes).

Prints the plain and constrained steps (ms/token, best of the repeats), the median ratio of back-to-back pairs (in
wall clock and process CPU time), and the teacher-forced mask's share of a plain step. Goal: the mask costs at most
5% of a plain step; the pairs' ratio checks it end to end, within the machine's noise.

Run:  .venv/bin/python benchmarks/structured.py [--preset small] [--new-tokens 64] [--repeats 15]
      .venv/bin/python benchmarks/structured.py --smoke   # tiny preset, a few seconds (checks the script runs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from longcat_lab.data import DataConfig, load_tokenizer
from longcat_lab.inference.generate import stream
from longcat_lab.inference.structured import ToolCallDecoder
from longcat_lab.model import presets
from longcat_lab.synth.agents import ENVIRONMENTS, ExpertSolver, TaskDesigner
from longcat_lab.testing import random_model

DOMAINS = ("bank", "shop")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded inside the call per run")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tasks", type=int, default=4, help="tasks whose expert calls are fed through the mask")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny preset, 8 tokens, 1 repeat, 1 task")
    return p.parse_args()


def domain_tools(domain: str) -> list[dict]:
    env = ENVIRONMENTS[domain](TaskDesigner(0, (domain,)).design(0).initial_state)
    return [t.spec() for t in env.tools()]


def expert_calls(tokenizer, n_tasks: int) -> list[tuple[list[dict], list[int]]]:
    """(offered tools, the ids of one call body as the template renders it) for every call the expert makes."""
    out = []
    for domain in DOMAINS:
        tools = domain_tools(domain)
        for i in range(n_tasks):
            for m in ExpertSolver(TaskDesigner(0, (domain,)).design(i)).run():
                for call in m.get("tool_calls") or []:
                    f = call.get("function", call)
                    body = json.dumps({"name": f["name"], "arguments": f["arguments"]}, ensure_ascii=False)
                    out.append((tools, tokenizer.encode(f"\n{body}\n").ids))
    return out


def time_mask_on_calls(decoder: ToolCallDecoder, calls, vocab: int) -> tuple[float, int]:
    """(seconds, tokens) of mask + advance over every expert call, teacher-forced."""
    logits = torch.zeros(vocab)
    tokens, t0 = 0, time.perf_counter()
    for tools, ids in calls:
        c = decoder.constraint(tools)
        c.advance(decoder.open_id)
        for t in [*ids, decoder.close_id]:
            c.mask(logits)
            c.advance(t)
            tokens += 1
        assert not c.in_call and c.error is None
    return time.perf_counter() - t0, tokens


class Replay:
    """Forces the tokens of a recorded run, after the `inner` constraint (if any) has masked the logits: both timed
    runs then decode the same tokens, so the model does the same work (its routing depends on the tokens)."""

    def __init__(self, tokens: list[int], inner=None):
        self.tokens, self.inner, self.i = tokens, inner, 0

    def mask(self, logits_V: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            logits_V = self.inner.mask(logits_V)
        forced = torch.full_like(logits_V, float("-inf"))
        forced[self.tokens[self.i]] = 0.0
        return forced

    def advance(self, token: int) -> None:
        if self.inner is not None:
            self.inner.advance(token)
        self.i += 1


def time_decoding(model, idx, tokens: list[int], decoder: ToolCallDecoder | None, tools) -> tuple[float, float]:
    """(wall, process CPU) seconds per new token of decoding `tokens` after `idx` (which ends with the open
    marker), with or without the tool-call constraint."""
    inner = None
    if decoder is not None:
        inner = decoder.constraint(tools)
        inner.advance(decoder.open_id)
    replay = Replay(tokens, inner)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in stream(model, idx, len(tokens), constraints=[replay]):
        pass
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert inner is None or inner.error is None
    return wall / len(tokens), cpu / len(tokens)


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.preset, args.new_tokens, args.repeats, args.tasks = "tiny", 8, 1, 1
    torch.set_num_threads(args.threads)
    config = presets.PRESETS[args.preset]()
    vocab = config.vocab_size
    tokenizer = load_tokenizer(vocab, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))
    model = random_model(config, seed=0)
    t0 = time.perf_counter()
    decoder = ToolCallDecoder(tokenizer, vocab)
    tools = domain_tools("bank") + domain_tools("shop")
    decoder.constraint(tools)
    setup = time.perf_counter() - t0
    prompt = tokenizer.encode("SYSTEM:You are a support agent. [Round 0] USER:Please move 40 to my savings. ASSISTANT:")
    idx = torch.tensor([[*prompt.ids, decoder.open_id]])
    calls = expert_calls(tokenizer, args.tasks)
    c = decoder.constraint(tools)
    c.advance(decoder.open_id)
    tokens = [int(t) for t in stream(model, idx, args.new_tokens, constraints=[c])]  # the run both replay
    time_decoding(model, idx, tokens[:2], decoder, tools)  # warm-up: first-call allocations of both paths
    time_decoding(model, idx, tokens[:2], None, tools)
    plain, masked, forced = [], [], []
    for r in range(args.repeats):
        pair = [(plain, None), (masked, decoder)]
        for times, d in pair if r % 2 == 0 else pair[::-1]:  # alternate which goes first
            times.append(time_decoding(model, idx, tokens, d, tools))
        seconds, n = time_mask_on_calls(decoder, calls, vocab)
        forced.append(seconds / n)
    # The median of back-to-back pairs' ratios, in wall clock and in process CPU time (less moved by other jobs).
    ratios = {k: statistics.median(m[k] / p[k] for p, m in zip(plain, masked)) for k in (0, 1)}
    plain, masked = [p[0] for p in plain], [m[0] for m in masked]
    step, step_masked, mask = min(plain), min(masked), min(forced)
    extra = max(ratios.values()) - 1  # the larger of the wall and CPU-time ratios
    print(f"preset {args.preset} (vocab {vocab}), batch 1, {args.threads} thread(s), best of {args.repeats}")
    print(f"tokenizer + grammar for {len(tools)} tools: {setup * 1e3:.1f} ms (once per agent)")
    print(f"plain decoding step:              {step * 1e3:8.3f} ms/token")
    print(f"constrained step (same tokens):   {step_masked * 1e3:8.3f} ms/token")
    print(f"constrained / plain, median pair: {ratios[0]:.3f} wall, {ratios[1]:.3f} CPU time")
    print(f"mask + advance on expert calls:   {mask * 1e3:8.3f} ms/token  ({mask / step:.1%} of a plain step)")
    print(f"goal: mask <= 5% of a plain step: {'met' if mask <= 0.05 * step else 'missed'}")
    print(f"check: the decoding pairs differ by {extra:+.1%} (the mask plus this machine's noise)")


if __name__ == "__main__":
    main()
