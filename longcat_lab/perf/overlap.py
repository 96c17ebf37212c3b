"""Measuring the ScMoE overlap under expert parallelism: spawn ranks that run the real model after
`apply_expert_parallel`, time the sequential and the overlapped schedule side by side, and write profiler traces
that `longcat_lab.perf.trace` reads (used by `benchmarks/overlap.py` and notebook 04).

"sequential" is the model with every exchange waited for at once (`overlap=False`, the vanilla order); "overlapped"
launches dispatch right after the first attention and combine after the experts, so the dense work runs while they
are in flight (docs/design.md §8.1).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from longcat_lab._util import check_choice, check_int
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import EXPERTS_AFTER
from longcat_lab.parallel.expert_parallel import apply_expert_parallel, set_schedule
from longcat_lab.parallel.launch import launch, rank_device
from longcat_lab.testing import random_model

OVERLAP = {"sequential": False, "overlapped": True}  # schedule name -> `overlap` of the all-to-all dispatcher


def overlap_worker(
    rank: int,
    world: int,
    config_dict: dict,
    seed: int,
    batch: int,
    seq_len: int,
    reps: int,
    trace_dir: str | None,
    backend: str = "gloo",
    experts_after: str = "attn1",
    profile_steps: int = 1,
) -> dict:
    """Time inference forward steps of the sequential and the overlapped schedule, interleaved (so drift from
    other load hits both alike), and optionally write `profile_steps` profiled steps of each into a Chrome/Perfetto
    trace `trace_dir/rank{rank}.json`. Each step starts after a barrier; returns per-step seconds by schedule."""
    device = rank_device(backend, rank)
    model = apply_expert_parallel(
        random_model(ModelConfig.from_dict(config_dict), seed, device=device), experts_after=experts_after
    )
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(schedule: str) -> float:
        set_schedule(model, OVERLAP[schedule], experts_after)
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        with record_function(f"ep.step.{schedule}"):
            model(idx)
        sync()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {s: [] for s in OVERLAP}
    with torch.no_grad():
        for schedule in OVERLAP:  # warm-up: allocator, gloo buffers
            step(schedule)
        for _ in range(reps):
            for schedule in OVERLAP:
                times[schedule].append(step(schedule))
        trace = None
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            trace = str(Path(trace_dir) / f"rank{rank}.json")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)

            def export(prof) -> None:  # atomic: a reader never sees half a trace
                prof.export_chrome_trace(trace + ".tmp")
                os.replace(trace + ".tmp", trace)

            # One unrecorded round first: the profiler's own start-up would otherwise land in the first step.
            warnings.filterwarnings("ignore", message=".*Profiler clears events")  # intended: skip the warm-up
            with torch.profiler.profile(
                activities=activities,
                on_trace_ready=export,
                schedule=torch.profiler.schedule(wait=0, warmup=1, active=1),
            ) as prof:
                for rounds in (1, profile_steps):
                    for _ in range(rounds):
                        for schedule in OVERLAP:
                            step(schedule)
                    prof.step()
    return {
        "rank": rank,
        "times": times,
        "trace": trace,
        "tokens": idx.numel(),
        "moved": [moe.dispatcher.last_stats for moe in model.moe_blocks()],
        "median_s": {s: statistics.median(t) for s, t in times.items()},
    }


def measure_overlap(
    config: ModelConfig,
    seed: int = 0,
    batch: int = 4,
    seq_len: int = 64,
    reps: int = 5,
    trace_dir: str | os.PathLike | None = None,
    world_size: int = 2,
    backend: str = "gloo",
    experts_after: str = "attn1",
    profile_steps: int = 1,
) -> dict:
    """Spawn `world_size` ranks running `overlap_worker` and summarise: a step ends when its slowest rank ends, so
    the step time of repetition i is the max over ranks. `ratio` is median(sequential) / median(overlapped);
    `paired_ratios` are sequential_i / overlapped_i of the same round (run back to back, so they share the load
    of the moment), summarised by their median and quartiles; `ratio_of_minima` is the least-disturbed view.
    In a script, call it under `if __name__ == "__main__":` (ranks are spawned processes)."""
    for name, value in (("batch", batch), ("seq_len", seq_len), ("reps", reps), ("profile_steps", profile_steps)):
        check_int(name, value)
    check_choice("experts_after", experts_after, EXPERTS_AFTER)
    results = launch(
        overlap_worker,
        world_size,
        args=(
            config.to_dict(),
            seed,
            batch,
            seq_len,
            reps,
            None if trace_dir is None else str(trace_dir),
            backend,
            experts_after,
            profile_steps,
        ),
        backend=backend,
    )
    step = {s: [max(r["times"][s][i] for r in results) for i in range(reps)] for s in OVERLAP}
    median = {s: statistics.median(v) for s, v in step.items()}
    paired = [a / b for a, b in zip(step["sequential"], step["overlapped"])]
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return {
        "step_s": step,
        "median_s": median,
        "ratio": median["sequential"] / median["overlapped"],
        "paired_ratios": paired,
        "paired_ratio_quartiles": quartiles,
        "ratio_of_minima": min(step["sequential"]) / min(step["overlapped"]),
        "ranks": results,
        "traces": [r["trace"] for r in results],
    }


__all__ = ["OVERLAP", "measure_overlap", "overlap_worker"]
