"""Expert parallelism and the one-GPU side stream, as swaps of the MoE's token dispatcher inside a `LongCatLM`
(docs/design.md §8.1): `apply_expert_parallel`, `apply_side_stream`, the exchange they use, and `launch` for ranks;
the training mesh and the torchrun launcher (`init_parallel`, `torchrun`, docs/design.md §8.2). Sharded checkpoints
are `longcat_lab.checkpoint.sharded`; training on several ranks is `longcat_lab.train.distributed`."""

from longcat_lab.parallel.exchange import Exchange, exchange
from longcat_lab.parallel.expert_parallel import (
    AllToAllDispatcher,
    all_reduce_replicated_grads,
    apply_expert_parallel,
    expert_shard_parameters,
    set_schedule,
)
from longcat_lab.parallel.launch import launch, rank_device, torchrun
from longcat_lab.parallel.mesh import ParallelContext, in_torchrun, init_parallel, restart_count
from longcat_lab.parallel.side_stream import SideStreamDispatcher, apply_side_stream, time_side_stream

__all__ = [
    "AllToAllDispatcher",
    "Exchange",
    "ParallelContext",
    "SideStreamDispatcher",
    "all_reduce_replicated_grads",
    "apply_expert_parallel",
    "apply_side_stream",
    "exchange",
    "expert_shard_parameters",
    "in_torchrun",
    "init_parallel",
    "launch",
    "rank_device",
    "restart_count",
    "set_schedule",
    "time_side_stream",
    "torchrun",
]
