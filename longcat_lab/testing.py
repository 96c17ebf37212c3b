"""Helpers for tests, benchmarks and notebooks: seeded random models and token batches, a tiny training config
(`tiny_train_config`), a checkpoint file rewritten with matching checksums (`rewrite_checkpoint_file`), the rank
worker that checks expert parallelism against one process (`parity_worker`), and `SyntheticRouting`, the plant on
which the budget controllers are compared. Not used by training."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longcat_lab.data.config import DataConfig
from longcat_lab.model import presets
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM
from longcat_lab.parallel.expert_parallel import (
    all_reduce_replicated_grads,
    apply_expert_parallel,
    expert_shard_parameters,
    set_schedule,
)
from longcat_lab.parallel.launch import rank_device
from longcat_lab.train.config import TrainConfig, train_preset
from longcat_lab.train.control import BiasController, ControllerConfig


def random_model(
    config: ModelConfig | None = None,
    seed: int = 0,
    *,
    bias_std: float = 0.0,
    device: str | torch.device = "cpu",
    train: bool = False,
) -> LongCatLM:
    """A `LongCatLM` (default: the tiny preset) whose weights depend only on `seed`, so that every process and every
    call builds the same one. `bias_std` > 0 draws the router's expert bias from N(0, bias_std) with the same
    generator, so that expert selection depends on the bias (as after training). Returned in eval mode unless
    `train`."""
    g = torch.Generator().manual_seed(seed)
    model = LongCatLM(config if config is not None else presets.tiny())
    model.reset_parameters(generator=g)
    if bias_std:
        with torch.no_grad():
            for moe in model.moe_blocks():
                moe.router.e_score_correction_bias.normal_(0.0, bias_std, generator=g)
    return model.to(device).train(train)


def random_ids(config: ModelConfig, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Uniform random token ids for `config`'s vocabulary, from their own seeded generator."""
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def tiny_train_config(cache_dir, steps: int = 12, **changes: Any) -> TrainConfig:
    """The tiny preset's training config shrunk for tests: batch 4 on one thread, a few hundred kB of data per
    domain cached in `cache_dir`, `steps` optimizer steps; `changes` override any field."""
    base = dict(
        batch_size=4,
        num_threads=1,
        peak_flops=1e10,
        data=DataConfig(max_bytes_per_domain=150_000, tokenizer_sample_bytes=60_000, cache_dir=cache_dir),
    )
    return dataclasses.replace(train_preset("tiny").with_steps(steps), **{**base, **changes})


def rewrite_checkpoint_file(ckpt: str | os.PathLike, name: str, data: bytes) -> None:
    """Replace file `name` of checkpoint folder `ckpt` by `data` and record its size and sha256 in meta.json, as a
    program that rewrote it on purpose would: a file whose checksum agrees but whose contents are not ours."""
    path, meta_path = Path(ckpt) / name, Path(ckpt) / "meta.json"
    path.write_bytes(data)
    meta = json.loads(meta_path.read_text())
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta_path.write_text(json.dumps(meta))


# Expert-parallel rank workers (spawned by `longcat_lab.parallel.launch`, so they live in an importable module) ---
EP_VARIANTS = ("sequential/attn1", "overlapped/attn1", "overlapped/ffn0")  # schedule/experts_after


def local_rows(batch: int, world: int, rank: int) -> slice:
    """This rank's share of the batch rows: contiguous, as even as possible (ranks may get different sizes)."""
    bounds = [round(batch * r / world) for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's x along dim 0. Sizes may differ; gloo's all_gather wants equal ones, so pad."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_objects(obj: Any, group=None) -> list[Any]:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _full(model: LongCatLM, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's expert shards gathered back to [N, ...]; replicated tensors as they are (on the CPU)."""
    shards = {id(p) for p in expert_shard_parameters(model)}
    return {
        name: (gather_rows(tensors[name]) if id(p) in shards else tensors[name]).detach().cpu()
        for name, p in model.named_parameters()
    }


def parity_worker(
    rank: int, world: int, config_dict: dict, seed: int, batch: int, seq_len: int, backend: str = "gloo"
) -> dict | None:
    """Compare a model after `apply_expert_parallel` with the same single-process model on the same batch.

    Checks, for each of `EP_VARIANTS`: full logits (gathered from all ranks) and loss, then every parameter's
    gradient (replicated ones all-reduced, expert shards gathered back to [N, ...]) and each rank's own expert
    shards' gradients; then one SGD step of both models and the logits after it; a forward with uneven per-rank
    batches; and the forward again with routing skewed so that no rank sends anything to the last rank (empty
    splits). Returns the tensors from rank 0 for the caller to compare (None on other ranks), plus every rank's
    dispatch counts."""
    device = rank_device(backend, rank)
    config = ModelConfig.from_dict(config_dict)
    ref = random_model(config, seed, device=device, train=True)
    ep = apply_expert_parallel(copy.deepcopy(ref))
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    rows = local_rows(batch, world, rank)
    share = inputs[rows].numel() / inputs.numel()
    ref_out = ref(inputs, targets=targets)
    ref_logits, ref_loss = ref_out.logits, ref_out.loss
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().cpu() for n, p in ref.named_parameters()}
    result: dict[str, Any] = {
        "ref_logits": ref_logits.detach().cpu(),
        "ref_loss": ref_loss.detach().cpu(),
        "ref_grads": ref_grads,
        "runs": {},
    }
    with torch.no_grad():
        routing = ref(inputs[rows], return_routing=True).routing
    ffn_pairs = [int((r.topk_ids < config.n_routed_experts).sum()) for r in routing.layers]
    for variant in EP_VARIANTS:
        schedule, experts_after = variant.split("/")
        set_schedule(ep, overlap=schedule == "overlapped", experts_after=experts_after)
        ep.zero_grad(set_to_none=True)
        out = ep(inputs[rows], targets=targets[rows])
        logits, loss = out.logits, out.loss
        (loss * share).backward()  # the global mean = sum over ranks of local mean * local share
        all_reduce_replicated_grads(ep)
        global_loss = (loss.detach() * share).reshape(1)
        dist.all_reduce(global_loss)
        result["runs"][variant] = {
            "logits": gather_rows(logits.detach()).cpu(),
            "loss": global_loss[0].cpu(),
            "grads": _full(ep, {n: p.grad for n, p in ep.named_parameters()}),
        }
    # Each rank's shards beside the slices of the single-process gradients they stand for (from the last variant).
    dispatcher = ep.moe_blocks()[0].dispatcher
    first, count = dispatcher.rank * dispatcher.local, dispatcher.local
    result["shards"] = gather_objects(
        [
            {"name": n, "grad": p.grad.detach().cpu(), "ref_slice": ref_grads[n][first : first + count]}
            for n, p in ep.named_parameters()
            if "mlp.experts." in n
        ]
    )
    result["moved"] = gather_objects(
        [
            {**moe.dispatcher.last_stats, "ref_ffn_pairs": n, "tokens": inputs[rows].numel()}
            for moe, n in zip(ep.moe_blocks(), ffn_pairs)
        ]
    )
    # One optimizer step of each model from its own gradients: the expert-parallel model trains as the real one.
    for model in (ref, ep):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        logits = ep(inputs[rows]).logits
        result["step"] = {
            "logits": gather_rows(logits).cpu(),
            "ref_logits": ref(inputs).logits.cpu(),
            "params": _full(ep, dict(ep.named_parameters())),
            "ref_params": {n: p.detach().cpu() for n, p in ref.named_parameters()},
        }
        # Uneven batches: rank r holds r + 1 sequences.
        sizes = [r + 1 for r in range(world)]
        lo = sum(sizes[:rank])
        uneven = torch.randint(0, config.vocab_size, (sum(sizes), seq_len), generator=gen).to(device)
        ep_uneven = ep(uneven[lo : lo + sizes[rank]]).logits
        result["uneven"] = {"logits": gather_rows(ep_uneven).cpu(), "ref_logits": ref(uneven).logits.cpu()}
        # Skewed routing: the last rank's experts are never chosen, so it receives nothing.
        last = list(range(config.n_routed_experts - config.n_routed_experts // world, config.n_routed_experts))
        for model in (ref, ep):
            for moe in model.moe_blocks():
                moe.router.e_score_correction_bias[last] = -10.0
        result["skewed"] = {"ref_logits": ref(inputs).logits.cpu()}
        for schedule in ("sequential", "overlapped"):
            set_schedule(ep, overlap=schedule == "overlapped")
            result["skewed"][schedule] = gather_rows(ep(inputs[rows]).logits).cpu()
        result["skewed"]["moved"] = gather_objects([moe.dispatcher.last_stats for moe in ep.moe_blocks()])
    try:
        apply_expert_parallel(random_model(config.replace(n_routed_experts=2 * world + 1), seed))
        result["uneven_experts_error"] = None
    except ValueError as err:
        result["uneven_experts_error"] = str(err)
    return result if rank == 0 else None


# A synthetic plant for the budget controller ------------------------------------------------------------------------
class SyntheticRouting:
    """Fixed, skewed router logits pushed through the real routers of a small model, with no training: the plant on
    which the tests and benchmarks/controller_tracking.py compare controllers.

    Each MoE block gets fixed inputs u_TD whose first coordinate is 1 and classifier rows whose first weight is a
    skew: FFN experts' preferences fall linearly from +ffn_skew to -ffn_skew (some hot, some cold), zero experts all
    get +zero_skew (at zero bias the FFN experts are then under-used for zero_skew > 0). The other coordinates add
    per-token variety with logit std `logit_std`. `batch_tokens` < tokens draws a fresh random batch each step
    (sampling noise, as in training); None routes all tokens every step (a noiseless plant)."""

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        tokens: int = 4096,
        ffn_skew: float = 1.0,
        zero_skew: float = 0.5,
        logit_std: float = 1.0,
        batch_tokens: int | None = None,
        seed: int = 0,
    ):
        if model_config is None:
            # The small preset's expert pool (16 FFN + 8 zero experts, top-6) behind the tiny preset's width.
            model_config = presets.tiny(n_routed_experts=16, zero_expert_num=8, moe_topk=6)
        if batch_tokens is not None and not (isinstance(batch_tokens, int) and 0 < batch_tokens <= tokens):
            raise ValueError(f"batch_tokens={batch_tokens!r} is not allowed: it must be None or in [1, {tokens}]")
        self.model = LongCatLM(model_config).train()
        self.batch_tokens = batch_tokens
        N, E, D = model_config.n_routed_experts, model_config.num_experts, model_config.hidden_size
        g = torch.Generator().manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed + 1)
        skew_E = torch.cat([torch.linspace(ffn_skew, -ffn_skew, N), torch.full((E - N,), float(zero_skew))])
        self.inputs = []
        with torch.no_grad():
            for block in self.model.moe_blocks():
                u_TD = torch.randn(tokens, D, generator=g)
                u_TD[:, 0] = 1.0
                W_ED = torch.randn(E, D, generator=g) * logit_std / math.sqrt(D - 1)
                W_ED[:, 0] = skew_E
                block.router.classifier.weight.copy_(W_ED)
                self.inputs.append(u_TD)

    def reset(self) -> None:
        """Zero every bias and count (a fresh start for the next controller)."""
        for block in self.model.moe_blocks():
            block.router.e_score_correction_bias.zero_()
            block.router.expert_counts.zero_()
        self.generator.manual_seed(self.generator.initial_seed())

    @torch.no_grad()
    def forward(self) -> None:
        """One step's routing: every router counts its selections, as training forwards do."""
        for block, u_TD in zip(self.model.moe_blocks(), self.inputs):
            if self.batch_tokens is not None:
                u_TD = u_TD[torch.randperm(u_TD.shape[0], generator=self.generator)[: self.batch_tokens]]
            block.router(u_TD)

    def run(self, config: ControllerConfig, steps: int) -> list[dict[str, Any]]:
        """Reset, then `steps` optimizer steps of routing + controller update; the controller's reports."""
        self.reset()
        controller = BiasController(config, self.model)
        reports = []
        for _ in range(steps):
            self.forward()
            reports.append(controller.step())
        return reports


# One small tool-use dialogue (a call, its result, the answer, a closing user turn) for tests of SFT data.
SFT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_balance",
            "description": "The balance of an account.",
            "parameters": {"type": "object", "properties": {"account": {"type": "string"}}},
        },
    }
]
SFT_MESSAGES = [
    {"role": "system", "content": "You are a bank's support agent."},
    {"role": "user", "content": "What is the balance of account A7?"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [{"type": "function", "function": {"name": "get_balance", "arguments": {"account": "A7"}}}],
    },
    {"role": "tool", "content": '{"balance": 120}'},
    {"role": "assistant", "content": "Account A7 holds 120."},
    {"role": "user", "content": "Thanks, that is all."},
]
