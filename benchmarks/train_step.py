"""A full training step of the small preset (the trainer's own step: sampling, forward with routing, aux losses,
backward, clipping, AdamW, controller), measured side by side with a matmul probe in one run.

Prints per thread count: tokens/s, model FLOP/s (`flops_per_token` at the measured FFN experts per token) and MFU
against the probe: fwd + bwd of one dense SwiGLU on the step's tokens with the model's dense-FFN shapes, the rate
this core reaches on the model's own best-case GEMMs. Steps and probes alternate, so both see the same machine load;
medians over the repeats. Also peak memory (process RSS; CUDA allocator peak on a GPU).
Goal: MFU >= 0.5 of the probe on one thread. The last line prints it.

`--write-golden` instead writes tests/golden/tiny_20_steps.json, the 20-step loss curve of the tiny preset that
tests/train/test_train.py checks (`golden_run` below is the one definition of that run).

Run: `.venv/bin/python benchmarks/train_step.py [--threads 1 2] [--repeats 5]`
     `.venv/bin/python benchmarks/train_step.py --write-golden`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longcat_lab.data import DataConfig
from longcat_lab.model import presets
from longcat_lab.perf import accounting
from longcat_lab.train import Trainer, train, train_preset

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "tiny_20_steps.json"


def golden_run(out_dir: str | Path) -> dict:
    """The golden run: tiny preset, 20 steps, Shakespeare + reasoning only (the stdlib differs between Python
    versions), one thread, its own tokenizer cache, seed 1234. Returns per-step series and versions."""
    import tokenizers

    out_dir = Path(out_dir)
    cfg = dataclasses.replace(
        train_preset("tiny").with_steps(20),
        num_threads=1,
        peak_flops=1e10,
        eval_every=0,
        ckpt_every=0,
        rg_every=0,
        batch_size=4,
        data=DataConfig(
            domains=("shakespeare", "reasoning"),
            max_bytes_per_domain=150_000,
            tokenizer_sample_bytes=60_000,
            cache_dir=str(out_dir / "cache"),
        ),
    )
    cfg.stages = [
        dataclasses.replace(s, mixture={k: v for k, v in s.mixture.items() if k != "python"}) for s in cfg.stages
    ]
    result = train(presets.tiny(), cfg, out_dir / "run", progress=False)
    rows = result.rows("train")
    keys = ("loss", "lm_loss", "balance_loss", "grad_norm", "ffn_experts_per_token")
    return {
        "versions": {
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
        },
        "series": {k: [r[k] for r in rows] for k in keys}
        | {"val_loss": [result.val_loss[d] for d in sorted(result.val_loss)]},
    }


def write_golden() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        got = golden_run(tmp)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    print(f"wrote {GOLDEN}: final loss {got['series']['loss'][-1]:.6f}")


def probe(tokens: int, d: int, f: int) -> tuple[float, float]:
    """(seconds, FLOPs) of fwd + bwd of one dense SwiGLU on `tokens` rows: the model's dense-FFN GEMM shapes."""
    x = torch.randn(tokens, d, requires_grad=True)
    w_gate, w_up, w_down = (
        torch.randn(f, d, requires_grad=True),
        torch.randn(f, d, requires_grad=True),
        torch.randn(d, f, requires_grad=True),
    )
    start = time.perf_counter()
    (F.silu(x @ w_gate.t()) * (x @ w_up.t()) @ w_down.t()).sum().backward()
    return time.perf_counter() - start, 3 * 2 * tokens * 3 * d * f


def bench(threads: int, repeats: int, cache: str | None) -> float:
    torch.set_num_threads(threads)
    mc = presets.small()
    cfg = dataclasses.replace(train_preset("small"), rg_every=0, peak_flops=1.0, data=DataConfig(cache_dir=cache or ""))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(mc, cfg, tmp, progress=False)
        seq = cfg.stages[0].seq_len
        tokens = cfg.batch_size * cfg.grad_accum * seq
        trainer.step()  # warm-up
        probe(tokens, mc.hidden_size, mc.ffn_hidden_size)
        steps, probes, ffn = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = trainer.step()
            steps.append(time.perf_counter() - t0)
            ffn.append(result.ffn_experts_per_token)
            seconds, probe_flops = probe(tokens, mc.hidden_size, mc.ffn_hidden_size)
            probes.append(seconds)
    step_s, probe_rate = statistics.median(steps), probe_flops / statistics.median(probes)
    k = statistics.mean(ffn)
    model_flops = accounting.flops_per_token(mc, seq, k) * tokens / step_s
    mfu = model_flops / probe_rate
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux -> GB
    print(
        f"{threads:>7} | {tokens / step_s:>8.0f} | {model_flops / 1e9:>12.2f} | {probe_rate / 1e9:>12.2f} | "
        f"{mfu:>5.2f} | {k:>5.2f} | {peak_rss:>6.2f}"
    )
    return mfu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", help="tokenizer/stream cache folder (default: the library's)")
    parser.add_argument("--write-golden", action="store_true", help="write tests/golden/tiny_20_steps.json")
    args = parser.parse_args()
    if args.write_golden:
        write_golden()
        return
    print(f"small preset train step, torch {torch.__version__}, median of {args.repeats} interleaved repeats")
    print("threads | tokens/s | model GFLOP/s | probe GFLOP/s |   MFU | FFN/t | RSS GB")
    mfus = {t: bench(t, args.repeats, args.cache) for t in args.threads}
    if torch.cuda.is_available():
        print(f"CUDA peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    if 1 in mfus:
        print(f"goal MFU >= 0.5 of the probe on one thread: {mfus[1]:.2f} ({'met' if mfus[1] >= 0.5 else 'not met'})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
