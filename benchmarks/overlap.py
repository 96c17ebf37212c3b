"""Does the ScMoE order hide the MoE's all-to-all? Step time sequential ÷ overlapped, and the hidden fraction.

CPU: two gloo ranks spawned on this machine, each running an inference forward of the model after
`apply_expert_parallel` (one thread per rank) in the sequential and the overlapped schedule, interleaved, a barrier
before every step; a step lasts as long as its slowest rank. Then a few profiled steps of each schedule per rank,
written as Chrome/Perfetto traces under --trace-dir, from which the communication time and the fraction of it that ran
under compute are read (`longcat_lab.perf.trace`). On loopback gloo the transfer itself is CPU work competing with
compute for the same cores, so expect a ratio near 1 on a small shared machine.
Goal: the overlapped schedule hides part of the exchange under compute (hidden fraction > 0 in the traces) and, where
the exchange does not compete with compute for the same cores, makes the step faster (ratio > 1).
GPU, when present: the one-GPU side-stream path (experts on the main stream ÷ on a side stream), and with two or
more GPUs the same two-rank measurement over NCCL.

Run: `.venv/bin/python benchmarks/overlap.py [--preset small] [--batch 4] [--seq-len 64] [--reps 10]
      [--profile-steps 3] [--experts-after attn1] [--trace-dir build/traces/overlap]`
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from longcat_lab.model import presets
from longcat_lab.model.model import EXPERTS_AFTER
from longcat_lab.parallel import time_side_stream
from longcat_lab.perf.overlap import measure_overlap
from longcat_lab.perf.trace import load_trace, stats_table
from longcat_lab.testing import random_model


def report_ranks(result: dict, label: str) -> None:
    med, q = result["median_s"], result["paired_ratio_quartiles"]
    print(
        f"{label}: median step sequential {med['sequential'] * 1e3:.1f} ms, overlapped "
        f"{med['overlapped'] * 1e3:.1f} ms over {len(result['step_s']['sequential'])} interleaved steps"
    )
    print(
        f"  per-round sequential / overlapped: median {q[1]:.3f}, quartiles {q[0]:.3f} .. {q[2]:.3f}; "
        f"ratio of the fastest steps {result['ratio_of_minima']:.3f}"
    )
    if all(result["traces"]):
        rows = stats_table([load_trace(p) for p in result["traces"]])
        for r in rows:
            print(
                f"  trace {r['schedule']:>10} rank {r['rank']} (mean of {r['steps']} steps): "
                f"step {r['step_ms']:.1f} ms, token exchange "
                f"{r['comm_ms']:.2f} ms, hidden under compute {r['hidden_ms']:.2f} ms "
                f"({r['hidden_fraction']:.0%}), count exchange {r['counts_ms']:.2f} ms, "
                f"blocked {r['wait_ms']:.2f} ms"
            )
        hidden = statistics.mean(r["hidden_fraction"] for r in rows if r["schedule"] == "overlapped")
        print(
            f"RESULT {label}: sequential / overlapped step time = {result['ratio']:.3f} (medians; per-round "
            f"median {q[1]:.3f}); hidden fraction (overlapped, mean over ranks) = {hidden:.2f}"
        )
    else:
        print(
            f"RESULT {label}: sequential / overlapped step time = {result['ratio']:.3f} (medians; per-round "
            f"median {q[1]:.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per schedule")
    parser.add_argument("--experts-after", default="attn1", choices=EXPERTS_AFTER)
    parser.add_argument("--trace-dir", type=Path, default=Path("build/traces/overlap"))
    args = parser.parse_args()
    config = presets.get(args.preset)
    print(
        f"preset {args.preset}: {config.num_layers} layers, d={config.hidden_size}, "
        f"{config.n_routed_experts}+{config.zero_expert_num} experts, top-{config.moe_topk}; "
        f"{args.batch} x {args.seq_len} tokens per rank; experts after {args.experts_after}"
    )
    cpu = measure_overlap(
        config,
        batch=args.batch,
        seq_len=args.seq_len,
        reps=args.reps,
        trace_dir=args.trace_dir / "gloo",
        experts_after=args.experts_after,
        profile_steps=args.profile_steps,
    )
    report_ranks(cpu, "2 gloo ranks on CPU")
    if not torch.cuda.is_available():
        print("GPU: none visible, so the side-stream and NCCL measurements were not run")
        return
    name = torch.cuda.get_device_name()
    model = random_model(config, 0, device="cuda")
    idx = torch.randint(
        0, config.vocab_size, (2 * args.batch, args.seq_len), generator=torch.Generator().manual_seed(1)
    ).cuda()
    gpu = time_side_stream(model, idx, reps=args.reps)
    print(
        f"RESULT one GPU ({name}): experts on the main stream / on a side stream = {gpu['ratio']:.3f} "
        f"({gpu['median_s']['sequential'] * 1e3:.2f} ms vs {gpu['median_s']['side_stream'] * 1e3:.2f} ms)"
    )
    if torch.cuda.device_count() >= 2:
        nccl = measure_overlap(
            config,
            batch=args.batch,
            seq_len=args.seq_len,
            reps=args.reps,
            trace_dir=args.trace_dir / "nccl",
            backend="nccl",
            experts_after=args.experts_after,
            profile_steps=args.profile_steps,
        )
        report_ranks(nccl, f"2 NCCL ranks ({name})")
    else:
        print("NCCL: needs two GPUs, one visible, so the two-rank GPU measurement was not run")


if __name__ == "__main__":
    main()
