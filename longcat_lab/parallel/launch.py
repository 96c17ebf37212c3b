"""Spawning ranks: run a function in `world_size` processes inside an initialised `torch.distributed` group (gloo on
CPU, NCCL with one GPU per rank), and the device each rank computes on."""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longcat_lab._util import check_choice, check_int

BACKENDS = ("gloo", "nccl")


def rank_device(backend: str, rank: int) -> torch.device:
    """Where rank `rank` computes: its own GPU under NCCL, the CPU under gloo."""
    return torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")


def _entry(
    rank: int,
    fn: Callable,
    world_size: int,
    backend: str,
    init_file: str,
    out_dir: str,
    threads: int,
    timeout_s: float,
    args: tuple,
) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        tmp = Path(out_dir) / f".result_{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, Path(out_dir) / f"result_{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable,
    world_size: int = 2,
    args: tuple = (),
    backend: str = "gloo",
    threads_per_rank: int = 1,
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes inside an initialised process group
    (file:// rendezvous in a temp dir, so nothing listens on a port) and return each rank's return value.
    `fn` must be importable (a module-level library function); a rank's exception is re-raised here, and a
    collective that hangs fails after `timeout_s`. In a script, call it under `if __name__ == "__main__":`."""
    check_choice("backend", backend, BACKENDS)
    check_int("world_size", world_size)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend='nccl' with world_size={world_size} needs that many GPUs; {torch.cuda.device_count()} visible"
        )
    with tempfile.TemporaryDirectory(prefix="longcat_ep_") as tmp:
        mp.start_processes(
            _entry,
            args=(fn, world_size, backend, os.path.join(tmp, "rendezvous"), tmp, threads_per_rank, timeout_s, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [torch.load(os.path.join(tmp, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]


__all__ = ["BACKENDS", "launch", "rank_device"]
