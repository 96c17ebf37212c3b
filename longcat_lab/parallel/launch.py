"""Starting ranks. `launch` runs a function in `world_size` spawned processes inside an initialised
`torch.distributed` group (gloo on CPU, NCCL with one GPU per rank), for tests, profiling and notebooks;
`torchrun` starts a command's workers under torchrun's elastic agent (what `longcat-lab train --nproc` does), which
restarts the whole group when a worker dies; `rank_device` is the device each rank computes on;
`die_with_parent` makes a rank or a sweep worker end when the process that started it ends (docs/design.md §9)."""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longcat_lab._util import check_choice, check_int

BACKENDS = ("gloo", "nccl")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RDZV_TIMEOUT_S = 600  # torchrun's own join timeout: other nodes may start minutes after the first


def die_with_parent(parent_pid: int) -> None:
    """End this process as soon as `parent_pid` (the process that started it) ends, however it ends (`kill -9`
    included), so that no rank or sweep worker trains on, orphaned, writing checkpoints and holding a run's lock.
    Linux: the kernel's parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL); elsewhere a daemon thread that
    watches the parent's PID once a second. Call it first thing in the child."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent ended before the signal was armed
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="die_with_parent", daemon=True).start()


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


def check_nnodes(nnodes: str) -> None:
    """Refuse (one line) a node count that is not N or MIN:MAX, positive integers with MIN <= MAX."""
    parts = str(nnodes).split(":")
    ok = 1 <= len(parts) <= 2 and all(p.isdigit() and int(p) >= 1 for p in parts)
    if not ok or int(parts[0]) > int(parts[-1]):
        raise ValueError(f"--nnodes={nnodes!r} is not allowed: it must be N or MIN:MAX, positive integers, MIN <= MAX")


def check_endpoint(endpoint: str) -> None:
    """Refuse (one line) a rendezvous endpoint that is not HOST:PORT with a port from 1 to 65535."""
    host, _, port = str(endpoint).rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--rdzv-endpoint={endpoint!r} is not allowed: it must be HOST:PORT, a port from 1 to 65535")


# Run in a child: a TCPStore client facing a program that accepts but never answers ignores its own timeout, so
# the alarm (whose default action ends the process) bounds it.
_PROBE = """import datetime, signal, sys
from torch.distributed import TCPStore
getattr(signal, "alarm", int)(int(sys.argv[3]))
TCPStore(sys.argv[1], int(sys.argv[2]), is_master=False, timeout=datetime.timedelta(seconds=int(sys.argv[3])))
"""


def probe_rendezvous(endpoint: str, timeout_s: int) -> None:
    """Refuse (one line) an endpoint where a program listens that does not answer as a rendezvous store within
    `timeout_s` (torchrun would wait there forever). Nothing listening is fine: this node may host the store, or
    the first node is not up yet (torchrun's join timeout covers that)."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout_s, 10)).close()
    except OSError:
        return
    cmd = [sys.executable, "-c", _PROBE, host, port, str(timeout_s)]
    try:
        ok = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout_s + 120)
    except subprocess.TimeoutExpired:
        ok = None
    if ok is None or ok.returncode != 0:
        raise ValueError(
            f"--rdzv-endpoint={endpoint!r} is not allowed: a program listens there but does not answer as a "
            f"rendezvous within --rdzv-timeout={timeout_s} s; choose a free port (or the first node's rendezvous)"
        )


def torchrun(
    module_args: list[str],
    nproc: int,
    max_restarts: int = 0,
    nnodes: str = "1",
    rdzv_endpoint: str = "",
    rdzv_id: str = "longcat",
    rdzv_timeout_s: int = RDZV_TIMEOUT_S,
) -> None:
    """`torchrun --nproc-per-node nproc ... -m longcat_lab *module_args` in this process: torchrun's elastic agent
    starts the workers, watches them, and restarts them all (up to `max_restarts` times) when one fails. One node:
    a standalone rendezvous on a free local port; several (`nnodes` "2" or "2:4"): the c10d rendezvous at
    `rdzv_endpoint` (host:port), run the same command on every node; joining it (and each read from its store)
    gives up after `rdzv_timeout_s` with a RendezvousError. Raises ChildFailedError when the workers fail for
    good."""
    from torch.distributed import run

    check_int("--nproc", nproc)
    check_int("--max-restarts", max_restarts, 0)
    check_int("--rdzv-timeout", rdzv_timeout_s)
    check_nnodes(nnodes)
    argv = ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), "--nnodes", str(nnodes)]
    if str(nnodes) in ("1", "1:1"):
        argv.append("--standalone")
    elif not rdzv_endpoint:
        raise ValueError(f"--nnodes={nnodes} is not allowed without --rdzv-endpoint HOST:PORT (one node's address)")
    else:
        check_endpoint(rdzv_endpoint)
        probe_rendezvous(rdzv_endpoint, rdzv_timeout_s)
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
        argv += ["--rdzv-conf", f"join_timeout={rdzv_timeout_s},read_timeout={rdzv_timeout_s}"]
    run.run(run.get_args_parser().parse_args([*argv, "-m", "longcat_lab", *module_args]))


__all__ = [
    "BACKENDS",
    "RDZV_TIMEOUT_S",
    "check_endpoint",
    "check_nnodes",
    "die_with_parent",
    "probe_rendezvous",
    "launch",
    "rank_device",
    "torchrun",
]
