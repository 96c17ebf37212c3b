"""How the trainer runs over processes, as a strategy object it is handed (torchtitan's parallel dims, picotron's
`apply_*`): `SingleProcess`, which does nothing, and `train.distributed.DataExpertParallel`, data parallelism over
every rank with the experts sharded. The trainer calls the same methods either way and never asks which it has.

What a strategy answers (`Parallelism`):
- `is_main`: this process writes the metrics, the progress bar, a checkpoint's small files, and holds the lock;
- `device(cfg)`: where this process trains;
- `shard(model)`: the model made this process's part of the run (called once, after it is built);
- `rows(batch_size)`: this process's rows of every global batch;
- `sharding`: how a checkpoint splits the weights over the ranks (`checkpoint.Sharding`, None for one process);
- `telemetry(...)`: the metrics writer;
- `global_statistics()`: the context in which a step's balance loss sees every rank's expert selections;
- `synchronize(model, losses, max_norm)`: after a step's backward, gradients (and the routers' counts) made the
  run's, clipped by the global norm; returns the losses averaged over the ranks and the pre-clip norm.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch

from longcat_lab.checkpoint import Sharding
from longcat_lab.model.model import LongCatLM
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.runtime import check_runtime
from longcat_lab.train.telemetry import Telemetry


class Parallelism(Protocol):
    is_main: bool
    sharding: Sharding | None

    def device(self, cfg: TrainConfig) -> torch.device: ...

    def shard(self, model: LongCatLM) -> LongCatLM: ...

    def rows(self, batch_size: int) -> slice: ...

    def telemetry(self, *args: Any, **kwargs: Any) -> Telemetry: ...

    def global_statistics(self) -> contextlib.AbstractContextManager: ...

    def synchronize(self, model: LongCatLM, losses: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]: ...


class SingleProcess:
    """One process holds the whole model and batch: nothing to shard, gather or synchronise."""

    is_main = True
    sharding = None

    def device(self, cfg: TrainConfig) -> torch.device:
        return check_runtime(cfg)

    def shard(self, model: LongCatLM) -> LongCatLM:
        return model

    def rows(self, batch_size: int) -> slice:
        return slice(None)

    def telemetry(self, *args: Any, **kwargs: Any) -> Telemetry:
        return Telemetry(*args, **kwargs)

    def global_statistics(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def synchronize(self, model: LongCatLM, losses: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
        params = [p for p in model.parameters() if p.requires_grad]
        return losses, float(torch.nn.utils.clip_grad_norm_(params, max_norm))


__all__ = ["Parallelism", "SingleProcess"]
