"""What a run checks before it starts, and what it needs of the machine it runs on: `check_runtime` (the
TrainConfig checks that depend on this machine: device, thread count, and the seed's range), `resolve_device`,
`check_positions` and `check_token_streams` (the config and the data fit the model), and the two process-wide
settings a run applies for its duration, `threads(n)` and `deterministic(on)`; `run_trainer` applies them around a
whole run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

from longcat_lab._util import check_seed
from longcat_lab.data import Dataset
from longcat_lab.model.config import ModelConfig
from longcat_lab.train.config import TrainConfig

# More threads than this only oversubscribes the cores, and very large counts crash the OpenMP runtime.
MAX_THREADS_PER_CPU = 4


def resolve_device(name: str) -> torch.device:
    """The torch device of `TrainConfig.device`; a ValueError naming the field when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not allowed: it must be 'auto', 'cpu', 'mps' or 'cuda[:N]'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(
                f"device={name!r} is not allowed: this machine has {count} CUDA device(s); use device=cpu or auto"
            )
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={name!r} is not allowed: MPS is not available here; use device=cpu or auto")
    return device


def check_runtime(cfg: TrainConfig) -> torch.device:
    """The checks of a TrainConfig that depend on this machine (device, thread count) or on the generators' range
    (seed); the CLI runs them before any work. Returns the device."""
    check_seed("seed", cfg.seed)
    limit = MAX_THREADS_PER_CPU * (os.cpu_count() or 1)
    if cfg.num_threads > limit:
        raise ValueError(
            f"num_threads={cfg.num_threads} is not allowed: it must be from 0 (torch's default) to {limit} "
            f"({MAX_THREADS_PER_CPU} per logical CPU of this machine)"
        )
    return resolve_device(cfg.device)


def check_positions(mc: ModelConfig, cfg: TrainConfig) -> int:
    """Every stage's and the evaluation's sequence length fit the model; returns the evaluation's."""
    for s in cfg.stages:
        if s.seq_len > mc.max_position_embeddings:
            raise ValueError(
                f"stage {s.name!r}: seq_len={s.seq_len} is not allowed: it must be <= "
                f"max_position_embeddings={mc.max_position_embeddings}"
            )
    eval_seq_len = cfg.eval_seq_len or cfg.stages[0].seq_len
    if eval_seq_len > mc.max_position_embeddings:
        raise ValueError(
            f"eval_seq_len={eval_seq_len} is not allowed: it must be <= "
            f"max_position_embeddings={mc.max_position_embeddings}"
        )
    return eval_seq_len


def check_token_streams(dataset: Dataset, vocab_size: int) -> None:
    """Every token id of every stream lies in the model's vocabulary: checked once when the data is loaded, so
    that the training forwards can skip the model's per-batch id check."""
    if dataset.tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tokenizer's {dataset.tokenizer.get_vocab_size()} tokens"
        )
    for split, streams in (("train", dataset.train), ("val", dataset.val)):
        for domain, ids in streams.items():
            lo, hi = (int(v) for v in torch.aminmax(ids.long())) if ids.numel() else (0, 0)
            if lo < 0 or hi >= vocab_size:
                raise ValueError(
                    f"the {split} stream of {domain!r} holds token ids from {lo} to {hi}; allowed "
                    f"ids are 0..{vocab_size - 1} (vocab_size={vocab_size})"
                )


@contextlib.contextmanager
def threads(n: int):
    """torch's thread count set to `n` (0: left as it is) for the block."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic(on: bool):
    """torch.use_deterministic_algorithms for the block (`TrainConfig.deterministic`)."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def run_trainer(
    trainer_class: type,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    parallel: Any = None,
):
    """Build a `trainer_class` (`train.trainer.Trainer` or a subclass) and run it, inside the thread count and
    determinism setting of `train_config`: what `train`, `train.sft.train_sft` and
    `train.distributed.train_distributed` share. Returns its `TrainResult`."""
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    check_runtime(train_config)  # before the thread count is applied: a huge one crashes the process
    with threads(train_config.num_threads), deterministic(train_config.deterministic):
        return trainer_class(model_config, train_config, out_dir, resume, progress, callback, parallel).run()


__all__ = [
    "MAX_THREADS_PER_CPU",
    "check_positions",
    "check_runtime",
    "check_token_streams",
    "deterministic",
    "resolve_device",
    "run_trainer",
    "threads",
]
