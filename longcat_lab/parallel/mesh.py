"""The device mesh of a training run (docs/design.md §8.2): a 2-D `DeviceMesh` ("dp", "ep") over every rank, with
gloo on CPU and NCCL with one GPU per rank.

Every rank gets its own rows of the global batch (data parallelism over all W ranks); the "ep" dimension groups E
ranks that split the FFN experts among themselves and exchange tokens all-to-all (`apply_expert_parallel`), so
expert parallelism borrows data-parallel ranks, as torchtitan does. The "dp" dimension (W / E ranks) joins ranks
that hold the same expert shard: their expert gradients are summed over it, and everything else over the world.

- `ParallelContext`: rank, world size, the mesh and its groups, this rank's rows of a batch and its device.
- `init_parallel(ep)`: joins the process group that torchrun describes in the environment (or uses the one already
  initialised, e.g. by `launch`), and builds the mesh.
- `in_torchrun()`, `restart_count()`: what torchrun's elastic agent tells a worker.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from longcat_lab._util import check_int


def in_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (or `longcat-lab train --nproc`)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def restart_count() -> int:
    """How many times torchrun's agent has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@dataclass
class ParallelContext:
    """Where this rank stands in the run. `ep == 1` is plain data parallelism (every rank holds every expert)."""

    mesh: DeviceMesh
    rank: int
    world: int
    ep: int
    device: torch.device

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the metrics, the progress bar and a checkpoint's small files."""
        return self.rank == 0

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` sequences (equal shares, rank order)."""
        share = batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(
                f"batch_size={batch_size} is not allowed with {self.world} ranks: the global batch must split "
                f"evenly, so it must be a multiple of {self.world}"
            )


def init_parallel(ep: int = 1, timeout_s: float = 300.0) -> ParallelContext:
    """Join (or reuse) the default process group and build the ("dp", "ep") mesh. Under torchrun the rendezvous
    comes from the environment (MASTER_ADDR, RANK, WORLD_SIZE ...); gloo on CPU, NCCL when CUDA is present."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "no process group: start distributed training with `longcat-lab train --nproc N` or torchrun"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # torchrun's agent keeps one store across restarts: without a fresh prefix per attempt, a restarted rank
        # can read a dead rank's address from the attempt before and fail to connect ("connection refused").
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=rank == 0 and not agent_store,
            timeout=timeout,
            multi_tenant=not agent_store,
        )
        store = dist.PrefixStore(f"longcat/attempt_{restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_int("ep", ep)
    if world % ep:
        raise ValueError(f"ep={ep} is not allowed with {world} ranks: it must divide the number of ranks")
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return ParallelContext(mesh, rank, world, ep, device)


__all__ = ["ParallelContext", "init_parallel", "in_torchrun", "restart_count"]
