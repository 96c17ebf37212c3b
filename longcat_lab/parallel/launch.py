"""Starting ranks. `launch` runs a function in `world_size` spawned processes inside an initialised
`torch.distributed` group (gloo on CPU, NCCL with one GPU per rank), for tests, profiling and notebooks;
`torchrun` starts a command's workers under torchrun's elastic agent (what `longcat-lab train --nproc` does), which
restarts the whole group when a worker dies; `rank_device` is the device each rank computes on."""

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


def torchrun(
    module_args: list[str],
    nproc: int,
    max_restarts: int = 0,
    nnodes: str = "1",
    rdzv_endpoint: str = "",
    rdzv_id: str = "longcat",
) -> None:
    """`torchrun --nproc-per-node nproc ... -m longcat_lab *module_args` in this process: torchrun's elastic agent
    starts the workers, watches them, and restarts them all (up to `max_restarts` times) when one fails. One node:
    a standalone rendezvous on a free local port; several (`nnodes` "2" or "2:4"): the c10d rendezvous at
    `rdzv_endpoint` (host:port), run the same command on every node. Raises ChildFailedError when the workers fail
    for good."""
    from torch.distributed import run

    check_int("--nproc", nproc)
    check_int("--max-restarts", max_restarts, 0)
    argv = ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), "--nnodes", str(nnodes)]
    if str(nnodes) in ("1", "1:1"):
        argv.append("--standalone")
    elif not rdzv_endpoint:
        raise ValueError(f"--nnodes={nnodes} is not allowed without --rdzv-endpoint HOST:PORT (one node's address)")
    else:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
    run.run(run.get_args_parser().parse_args([*argv, "-m", "longcat_lab", *module_args]))


__all__ = ["BACKENDS", "launch", "rank_device", "torchrun"]
