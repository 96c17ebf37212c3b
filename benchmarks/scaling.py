"""Training throughput on one process and on two ranks (data parallel, and data + expert parallel), side by side
in one run, with the same global batch: tokens/s from each run's metrics.jsonl (the median over the steps after
the first few, which warm up), and the ratio to one process on one thread.

On a two-core CPU the honest comparison is with one process on two threads: two ranks of one thread each use the
same two cores. The GPU column (NCCL, one GPU per rank) is skipped where there is no GPU.

Run: `.venv/bin/python benchmarks/scaling.py [--preset mini] [--steps 30] [--batch 16]` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path

import torch

from longcat_lab.data import DataConfig
from longcat_lab.model import presets
from longcat_lab.train import read_metrics, train, train_preset
from longcat_lab.train.distributed import train_ranks

WARMUP = 5


def tokens_per_s(run_dir: Path) -> float:
    rows = read_metrics(run_dir / "metrics.jsonl", "train")[WARMUP:]
    return statistics.median(r["tokens_per_s"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini", choices=("tiny", "mini", "small"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences per step)")
    args = parser.parse_args()
    model_config = presets.get(args.preset)
    with tempfile.TemporaryDirectory(prefix="longcat_scaling_") as tmp:
        root = Path(tmp)
        cfg = dataclasses.replace(
            train_preset(args.preset).with_steps(args.steps),
            batch_size=args.batch,
            eval_every=0,
            eval_windows=2,
            ckpt_every=0,
            rg_every=0,
            peak_flops=1e10,
            data=DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000, cache_dir=str(root / "c")),
        )
        results = {}
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                train(
                    model_config, dataclasses.replace(cfg, num_threads=threads), root / f"one_{threads}", progress=False
                )
            finally:
                torch.set_num_threads(before)
            results[f"1 process, {threads} thread(s)"] = tokens_per_s(root / f"one_{threads}")
        one_thread = dataclasses.replace(cfg, num_threads=1)
        train_ranks(
            model_config, one_thread, [{"out_dir": str(root / "dp"), "ep": 1}, {"out_dir": str(root / "ep"), "ep": 2}]
        )
        results["2 ranks x 1 thread, data parallel"] = tokens_per_s(root / "dp")
        results["2 ranks x 1 thread, data + expert parallel"] = tokens_per_s(root / "ep")
    base = results["1 process, 1 thread(s)"]
    print(f"preset {args.preset}, global batch {args.batch} x {cfg.stages[0].seq_len} tokens, {args.steps} steps")
    print(f"{'configuration':45s} {'tokens/s':>10s} {'vs 1 thread':>12s}")
    for name, tps in results.items():
        print(f"{name:45s} {tps:10.0f} {tps / base:11.2f}x")
    gpu = "skipped: no GPU here" if not torch.cuda.is_available() else "run with NCCL: longcat-lab train --nproc N"
    print(f"GPU column: {gpu}")


if __name__ == "__main__":
    main()
