"""Records of routing decisions: what the router chose for each token (`RouterOutput`, per MoE block), and what a
forward hands to losses, metrics, the controller and plots (`LayerRouting` per layer, `Routing` per model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class RouterOutput(NamedTuple):
    """What `Router.forward` returns for T tokens (paper Eq. 1, 8): a NamedTuple, so it also unpacks as a tuple."""

    topk_ids_TK: torch.Tensor  # [T, K] chosen experts; ids >= n_routed_experts are zero experts
    topk_weights_TK: torch.Tensor  # [T, K] fp32, routed_scaling_factor * probability, in the graph
    logits_TE: torch.Tensor  # [T, E] fp32 router logits, in the graph
    probs_TE: torch.Tensor  # [T, E] fp32 softmax of the logits, in the graph


@dataclass
class LayerRouting:
    """What one MoE block decided, for every token (shapes [B, S, ...])."""

    topk_ids: torch.Tensor  # [B, S, K] chosen experts; ids >= n_routed_experts are zero experts
    topk_weights: torch.Tensor  # [B, S, K] fp32, routed_scaling_factor * probability
    ffn_experts_per_token: torch.Tensor  # [B, S] how many of the K choices are FFN experts
    router_logits: torch.Tensor  # [B, S, E] fp32, attached to the graph (for z-losses)
    router_probs: torch.Tensor  # [B, S, E] fp32 softmax, attached to the graph (for the balance loss)

    @classmethod
    def from_router(cls, routed: RouterOutput, n_ffn: int, B: int, S: int) -> LayerRouting:
        """The [B, S, ...] record of a block's `RouterOutput` over B*S tokens."""
        return cls(
            topk_ids=routed.topk_ids_TK.view(B, S, -1),
            topk_weights=routed.topk_weights_TK.view(B, S, -1),
            ffn_experts_per_token=(routed.topk_ids_TK < n_ffn).sum(-1).view(B, S),
            router_logits=routed.logits_TE.view(B, S, -1),
            router_probs=routed.probs_TE.view(B, S, -1),
        )


@dataclass
class Routing:
    """Per-layer routing (None for dense layers) and the last hidden state before the final norm (hidden z-loss)."""

    layers: list[LayerRouting | None]
    last_hidden: torch.Tensor
    n_routed_experts: int
