"""Model-growth initialisation and width hyperparameter transfer (paper 3.1.1-3.1.2; docs/design.md §3.2).

- `grow_depth(model, r)`: a model r times as deep whose layer stack is the trained one repeated,
  L_target = L_small o L_small (r = 2 in the paper, 14 -> 28 layers); the embedding, final norm and LM head are kept
  once ("embeddings set aside"). The trainer uses it for `TrainConfig.init_from`, optionally continuing the source
  run's step counter, LR schedule and data position (`init_keep_state`), as the paper keeps its training state.
- Width transfer (Everett et al. 2024, "Adam LR full align", standard parameterisation; paper Table 1): with
  s = n_target / n_proxy, the embedding keeps the proxy's init variance and LR, while hidden and unembedding
  matrices take sigma^2 / s and eta / s. `transfer_hparams` states the rule; `init_with_transfer` and
  `param_groups` apply it to a model and an optimizer (the model's `initializer_range` and the stage LRs being the
  proxy's tuned values); `adamw` is the trainer's optimizer over those groups.
- `init_from_checkpoint(model, source)`: growth init of a model from a checkpoint (`TrainConfig.init_from`).
"""

from __future__ import annotations

import math

import torch

from longcat_lab import checkpoint
from longcat_lab._util import is_number
from longcat_lab.model.model import LongCatLM
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.schedule import lr_at

KINDS = ("embedding", "hidden", "unembedding")
# Where torch has a fused AdamW kernel that `adamw` uses.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def param_kind(name: str) -> str:
    """Which transfer rule a parameter follows: the input embedding, the LM head, or everything in between."""
    if name.startswith(("embed_tokens.", "mtp.embed_tokens.")):  # the MTP module's copy too (docs/design.md §1.5)
        return "embedding"
    if name.startswith("lm_head."):
        return "unembedding"
    return "hidden"


def transfer_hparams(width_factor: float, init_std: float = 1.0, lr: float = 1.0) -> dict[str, dict[str, float]]:
    """Per kind, the target model's init std and LR from the proxy's (docs/design.md §3.2, paper Table 1): embedding
    copied; hidden and unembedding sigma^2 / s (so std / sqrt(s)) and eta / s."""
    s = width_factor
    if not is_number(s) or s <= 0:
        raise ValueError(f"width_factor={s!r} is not allowed: it must be a finite number > 0 (target / proxy width)")
    return {
        "embedding": {"init_std": init_std, "lr": lr},
        "hidden": {"init_std": init_std / math.sqrt(s), "lr": lr / s},
        "unembedding": {"init_std": init_std / math.sqrt(s), "lr": lr / s},
    }


@torch.no_grad()
def init_with_transfer(model: LongCatLM, width_factor: float = 1.0, generator: torch.Generator | None = None) -> None:
    """The model's usual init (normal(0, initializer_range), ones for norms), then hidden and unembedding matrices
    scaled to the transferred std. width_factor=1 leaves the usual init unchanged."""
    model.reset_parameters(generator=generator)
    rule = transfer_hparams(width_factor)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and rule[param_kind(name)]["init_std"] != 1.0:
            p.mul_(rule[param_kind(name)]["init_std"])


def param_groups(model: LongCatLM, width_factor: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: one per (kind, decayed or not), each with `lr_mult` from the transfer rule (the
    trainer sets lr = schedule * lr_mult). Matrices are decayed; norm weights (1-D) are not."""
    rule = transfer_hparams(width_factor)
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind, decay = param_kind(name), p.dim() >= 2
        g = groups.setdefault(
            (kind, decay),
            {
                "params": [],
                "name": f"{kind}{'' if decay else '_no_decay'}",
                "lr_mult": rule[kind]["lr"],
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
    return list(groups.values())


def adamw(model: LongCatLM, cfg: TrainConfig, width_factor: float = 1.0) -> torch.optim.AdamW:
    """The trainer's optimizer: AdamW over `param_groups` with `cfg`'s betas, eps and weight decay, starting at the
    schedule's first LR. On CPU and CUDA it is torch's fused kernel, one pass over each tensor instead of a dozen
    elementwise ops: faster than the default per-parameter loop on CPU (benchmarks/RESULTS.md "train_step"), the same
    update to float rounding (docs/design.md §3.4)."""
    return torch.optim.AdamW(
        param_groups(model, width_factor=width_factor, weight_decay=cfg.weight_decay),
        lr=lr_at(cfg.stages, 0),
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=True if model.device.type in FUSED_ADAMW_DEVICES else None,
    )


@torch.no_grad()
def grow_depth(model: LongCatLM, factor: int = 2) -> LongCatLM:
    """A new model with num_layers * factor layers: layer i is a copy of the source's layer i mod L (weights, expert
    biases and all), embedding, final norm and LM head copied once. factor=1 returns a plain copy."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor={factor!r} is not allowed: it must be a positive integer (the paper uses 2)")
    L = model.config.num_layers
    grown = LongCatLM(model.config.replace(num_layers=L * factor)).to(model.device)
    grown.embed_tokens.load_state_dict(model.embed_tokens.state_dict())
    grown.norm.load_state_dict(model.norm.state_dict())
    grown.lm_head.load_state_dict(model.lm_head.state_dict())
    for i, layer in enumerate(grown.layers):
        layer.load_state_dict(model.layers[i % L].state_dict())
    if model.mtp is not None:  # the MTP module (docs/design.md §1.5) follows the last layer, whatever the depth
        grown.mtp.load_state_dict(model.mtp.state_dict())
    return grown.train(model.training)


def init_from_checkpoint(model: LongCatLM, source: str) -> dict:
    """Growth init (docs/design.md §3.2): the weights of checkpoint `source` (or a run folder's newest that verifies),
    stacked to `model`'s depth, loaded into `model`; returns the source's meta. A source without the MTP module may
    start a model with one (docs/design.md §1.5): the module is then new, its embedding copied. The context length
    may differ (fine-tuning on longer dialogues, docs/design.md §5.4): RoPE angles are computed per position, so
    max_position_embeddings sizes no weight."""
    src_model, _, meta = checkpoint.load(source)
    grown = grow_depth(src_model, model.config.num_layers // max(1, src_model.config.num_layers))
    adds_mtp = src_model.mtp is None and model.mtp is not None
    expected = grown.config.replace(max_position_embeddings=model.config.max_position_embeddings)
    if (expected.replace(num_nextn_predict_layers=1) if adds_mtp else expected) != model.config:
        raise ValueError(
            f"init_from={source!r} is not allowed: stacking its {src_model.config.num_layers}-layer "
            f"model does not give this ModelConfig (depth must be a multiple and all else equal)"
        )
    model.load_state_dict(grown.state_dict(), strict=not adds_mtp)
    if adds_mtp:
        model.mtp.start_from(model)
    return meta


__all__ = [
    "KINDS",
    "param_kind",
    "transfer_hparams",
    "init_with_transfer",
    "param_groups",
    "adamw",
    "grow_depth",
    "init_from_checkpoint",
]
