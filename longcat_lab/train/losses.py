"""Auxiliary losses: the device-level load-balance loss (paper Eq. 3-5; docs/design.md §2.2), the hidden z-loss
(paper Eq. 10; docs/design.md §3.1) and an optional router z-loss (ST-MoE). Each is computed per MoE layer and summed
over layers (an aux loss over all layers at once lets one layer's imbalance hide behind another's), has its own
coefficient, and is returned separately so the trainer can log it. They are added to the LM loss; the expert bias
is steered elsewhere (`longcat_lab.train.control`) and no loss here touches it.

Shape legend: B batch, S sequence, T = B*S tokens, E = N + Z experts, N FFN experts, K top-k, D groups of FFN experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longcat_lab._util import check_int, check_nonnegative, from_known_fields, is_number
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.routing import LayerRouting, Routing

LOSS_KEYS = ("balance_loss", "hidden_z_loss", "router_z_loss")


@dataclass
class LossConfig:
    """Coefficients of the auxiliary losses (training config)."""

    # alpha of Eq. 3 (unpublished). The paper keeps R_g < 0.1 (docs/design.md §2.3): on the tiny preset's training run
    # R_g drops under 0.1 within 20 steps at 1e-3 but only after 40-60 at 1e-2 (benchmarks/controller_tracking.py).
    balance_loss_coef: float = 1e-3
    # D, the number of FFN-expert groups (EP groups in the paper); one group plus the zero group on a single device.
    balance_groups: int = 1
    # lambda of Eq. 10, "very small" and unpublished; 1e-7 (a secondary note's value) is negligible at O(1)
    # activations and only bites once the last hidden state grows into the hundreds (the massive activations it is for).
    hidden_z_loss_coef: float = 1e-7
    # ST-MoE's router z-loss; LongCat-Flash does not use one, so it is off (0) unless an experiment turns it on.
    router_z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("balance_loss_coef", "hidden_z_loss_coef", "router_z_loss_coef"):
            check_nonnegative(name, getattr(self, name))  # 0 turns a loss off
        check_int("balance_groups", self.balance_groups)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossConfig:
        """Build from a dict, refusing unknown keys (`_util.from_known_fields`)."""
        return from_known_fields(cls, data)


# The process group whose selections the balance loss counts (None: this process's only); set by `global_statistics`.
_STATS_GROUP: Any = None


@contextlib.contextmanager
def global_statistics(group: Any) -> Iterator[None]:
    """Inside the block, `balance_loss_layer` takes f_j from the selections of every rank of `group` (summed with
    one all-reduce per layer), so that the mean of the ranks' losses is the loss of the whole batch and its gradient
    is that of one process on the whole batch (docs/design.md §8.3). `group=None` changes nothing."""
    global _STATS_GROUP
    before, _STATS_GROUP = _STATS_GROUP, group
    try:
        yield
    finally:
        _STATS_GROUP = before


def balance_loss_layer(
    layer: LayerRouting, n_ffn: int, top_k: int, target_ffn_experts: float, groups: int = 1
) -> torch.Tensor:
    """One layer's sum_j f_j P_j of Eq. 3 (without alpha), over D FFN-expert groups plus the zero group.

    P_j = (1/T) sum_t sum_{i in group j} p_{t,i} carries the gradient; f_j is a constant from the selections:
    f_j = D/(K_e T) * (selections of group j) for FFN groups, f_zero = 1/((K - K_e) T) * (zero-expert selections).
    We count selections, not tokens (open question 11.5): with counts every f_j equals 1 exactly when the FFN groups
    share K_e experts per token evenly and zero experts take the other K - K_e, which is what the normalisers encode.
    A group whose normaliser is 0 (K_e = 0 for FFN groups, K_e = K for the zero group) is left out."""
    N, D = n_ffn, groups
    probs_TE = layer.router_probs.reshape(-1, layer.router_probs.shape[-1])
    ids_P = layer.topk_ids.reshape(-1)
    T, E = probs_TE.shape
    if N % D:
        raise ValueError(f"balance_groups={D} is not allowed: it must divide n_routed_experts={N}")
    group_E = torch.arange(E, device=probs_TE.device) // (N // D)
    group_E[N:] = D  # every zero expert is group D+1
    n_groups = D + 1 if E > N else D
    P_G = torch.zeros(n_groups, dtype=probs_TE.dtype, device=probs_TE.device).index_add(0, group_E, probs_TE.sum(0)) / T
    with torch.no_grad():
        picks_G = torch.bincount(group_E[ids_P], minlength=n_groups).to(probs_TE.dtype)
        T_picks = T
        if _STATS_GROUP is not None:  # f_j of the global batch; P_j stays this rank's (its gradient is local)
            picks_T = torch.cat([picks_G, picks_G.new_tensor([T])])
            dist.all_reduce(picks_T, group=_STATS_GROUP)
            picks_G, T_picks = picks_T[:-1], picks_T[-1]
        norm_G = torch.full(
            (n_groups,),
            D / target_ffn_experts if target_ffn_experts > 0 else 0.0,
            dtype=probs_TE.dtype,
            device=probs_TE.device,
        )
        if E > N:
            zero_share = top_k - target_ffn_experts
            norm_G[D] = 1.0 / zero_share if zero_share > 0 else 0.0
        f_G = norm_G * picks_G / T_picks
    return (f_G * P_G).sum()


def hidden_z_loss(last_hidden: torch.Tensor) -> torch.Tensor:
    """(1/T) sum_t (log sum_i exp|z_t,i|)^2 over the last hidden state before the final norm (paper Eq. 10), in fp32."""
    z_TD = last_hidden.reshape(-1, last_hidden.shape[-1]).float()
    return torch.logsumexp(z_TD.abs(), dim=-1).pow(2).mean()


def router_z_loss_layer(layer: LayerRouting) -> torch.Tensor:
    """(1/T) sum_t (log sum_e exp(logit_t,e))^2 of one router (ST-MoE, Zoph et al. 2022), in fp32."""
    logits_TE = layer.router_logits.reshape(-1, layer.router_logits.shape[-1]).float()
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def aux_losses(
    routing: Routing, loss_config: LossConfig, model_config: ModelConfig, target_ffn_experts: float
) -> dict[str, torch.Tensor]:
    """{"balance_loss", "hidden_z_loss", "router_z_loss"}: 0-dim tensors, coefficients applied, per-layer losses
    summed over MoE layers. A loss whose coefficient is 0 is a constant 0 (not computed)."""
    K = model_config.moe_topk
    if not is_number(target_ffn_experts) or not 0 <= target_ffn_experts <= K:
        raise ValueError(f"target_ffn_experts={target_ffn_experts!r} is not allowed: it must lie in [0, moe_topk={K}]")
    if model_config.n_routed_experts % loss_config.balance_groups:
        raise ValueError(
            f"balance_groups={loss_config.balance_groups} is not allowed: it must divide "
            f"n_routed_experts={model_config.n_routed_experts}"
        )
    layers = [layer for layer in routing.layers if layer is not None]
    out = {key: routing.last_hidden.new_zeros((), dtype=torch.float32) for key in LOSS_KEYS}
    if loss_config.balance_loss_coef and layers:
        out["balance_loss"] = loss_config.balance_loss_coef * sum(
            balance_loss_layer(
                layer, model_config.n_routed_experts, K, float(target_ffn_experts), loss_config.balance_groups
            )
            for layer in layers
        )
    if loss_config.hidden_z_loss_coef:
        out["hidden_z_loss"] = loss_config.hidden_z_loss_coef * hidden_z_loss(routing.last_hidden)
    if loss_config.router_z_loss_coef and layers:
        out["router_z_loss"] = loss_config.router_z_loss_coef * sum(router_z_loss_layer(layer) for layer in layers)
    return out


__all__ = [
    "LOSS_KEYS",
    "LossConfig",
    "aux_losses",
    "balance_loss_layer",
    "global_statistics",
    "hidden_z_loss",
    "router_z_loss_layer",
]
