"""The MoE block (paper 2.1, Eq. 1; docs/design.md §1.4): the router with its expert bias, the N SwiGLU experts and
Z zero-computation (identity) experts, the few-token path the experts take when decoding, and the MoE that runs
them as start / compute / finish behind a swappable token dispatcher (`longcat_lab.model.dispatch`).

Shape legend: T tokens (B*S), D model dim, F expert hidden, E = N + Z experts, N FFN experts, Z zero experts,
K top-k, P (token, expert) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab.model.cache import LatentCache
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.dispatch import LocalDispatcher, MoEPending, region
from longcat_lab.model.ops.expert_dispatch import ExpertDispatch, to_dtype
from longcat_lab.model.routing import LayerRouting, RouterOutput


# Router --------------------------------------------------------------------------------------------------------
class Router(nn.Module):
    """p = softmax(W_r u) in fp32; S = TopK(p + b); weights = gamma * p_S (paper Eq. 1, 8; docs/design.md D2).

    `e_score_correction_bias` (b, over FFN and zero experts) is a persistent buffer that changes selection only.
    `expert_counts` is a non-persistent buffer of selections per expert that only training forwards add to; the
    controller reads and clears it once per optimizer step. `force_balanced` (for tests) makes token t choose
    experts (t*K + j) mod E, so every expert is used while weights still come from the router."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.moe_topk
        self.num_experts = config.num_experts
        self.scale = config.routed_scaling_factor
        self.classifier = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.register_buffer("expert_counts", torch.zeros(config.num_experts, dtype=torch.long), persistent=False)
        self.force_balanced = False

    def forward(self, u_TD: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(to_dtype(u_TD, torch.float32), to_dtype(self.classifier.weight, torch.float32))
        probs_TE = logits_TE.softmax(dim=-1)
        with torch.no_grad():
            if self.force_balanced:
                T = u_TD.shape[0]
                slots_TK = torch.arange(T, device=u_TD.device)[:, None] * self.top_k + torch.arange(
                    self.top_k, device=u_TD.device
                )
                topk_ids_TK = slots_TK % self.num_experts
            else:
                topk_ids_TK = torch.topk(probs_TE + self.e_score_correction_bias, self.top_k, dim=-1).indices
            if self.training:
                self.expert_counts += torch.bincount(topk_ids_TK.flatten(), minlength=self.num_experts)
        topk_weights_TK = probs_TE.gather(1, topk_ids_TK) * self.scale
        return RouterOutput(topk_ids_TK, topk_weights_TK, logits_TE, probs_TE)


# Experts -------------------------------------------------------------------------------------------------------
def sort_pairs(topk_ids_TK: torch.Tensor, n_ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_P, counts_N): the T*K (token, expert) pairs sorted by expert id (stable, so FFN experts, ids < N,
    come first and each expert's pairs keep token order), and how many pairs each FFN expert got. Pair p belongs to
    token p // K. The expert-parallel dispatcher uses this too, before it swaps the counts with other ranks."""
    ids_P = topk_ids_TK.reshape(-1)
    return torch.argsort(ids_P, stable=True), torch.bincount(ids_P, minlength=n_ffn + 1)[:n_ffn]


def zero_expert_output(
    x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, n_ffn: int
) -> torch.Tensor:
    """What the zero (identity) experts add: the summed weight of each token's chosen zero experts times the token
    (paper Eq. 1; weights scaled like every other expert's, docs/design.md D2)."""
    zero_weight_T1 = topk_weights_TK.masked_fill(topk_ids_TK < n_ffn, 0.0).sum(dim=-1, keepdim=True)
    return to_dtype(zero_weight_T1, x_TD.dtype) * x_TD


class Experts(nn.Module):
    """N SwiGLU experts as stacked weights (gate and up fused, as transformers 5.x) and Z identity experts with none.

    Dispatch: sort the T*K (token, expert) pairs by expert, run each FFN expert on its contiguous slice, scale by the
    pair's weight and scatter-add back; the zero experts add weight * x in one elementwise step. Without gradients the
    grouped kernel runs outside autograd, and a few tokens (batch-1 decoding, a speculative verification) skip the
    sort: each chosen expert runs on each token directly (`experts_few_tokens`). Given a decoding `LatentCache` (and
    no gradients), the weights come from its transposed copies (`LatentCache.transposed`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        N, D, F_ = config.n_routed_experts, config.hidden_size, config.expert_ffn_hidden_size
        self.n_ffn = N
        self.gate_up_proj = nn.Parameter(torch.empty(N, 2 * F_, D))  # per expert [gate ; up], Linear layout
        self.down_proj = nn.Parameter(torch.empty(N, D, F_))

    def forward(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        K = topk_ids_TK.shape[1]
        N = self.n_ffn
        grad = torch.is_grad_enabled()
        if not grad and 0 < x_TD.shape[0] <= FEW_TOKENS:  # decoding, speculative verification (a rank may get 0)
            return experts_few_tokens(self, x_TD, topk_ids_TK, topk_weights_TK, cache)
        order_P, counts_N = sort_pairs(topk_ids_TK, N)  # P = T*K pairs
        sizes = counts_N.tolist()  # the block's one host sync: slice sizes
        n_pairs = sum(sizes)
        pair_idx = order_P[:n_pairs]
        token_idx = pair_idx // K
        out_TD = zero_expert_output(x_TD, topk_ids_TK, topk_weights_TK, N)
        if not n_pairs:
            return out_TD
        weights_P = topk_weights_TK.reshape(-1)[pair_idx]
        if grad:
            return out_TD + ExpertDispatch.apply(x_TD, token_idx, weights_P, self.gate_up_proj, self.down_proj, sizes)
        weights_t = transposed_experts(self, cache)
        return out_TD + to_dtype(ExpertDispatch.compute(x_TD, token_idx, weights_P, *weights_t, sizes)[0], x_TD.dtype)


# The few-token expert path -------------------------------------------------------------------------------------
# Up to this many tokens the experts run token by token (`experts_few_tokens`) rather than sorted by expert: at a
# handful of tokens the sort's glue costs more than running a shared expert twice.
FEW_TOKENS = 4


def transposed_experts(experts: Experts, cache: LatentCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert weights transposed, [N, D, 2F] and [N, F, D], for the no-gradient paths: the decoding cache's
    contiguous copies when there is a cache, else views of the parameters."""
    if cache is not None:
        return cache.transposed(experts.gate_up_proj), cache.transposed(experts.down_proj)
    return experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)


def experts_few_tokens(
    experts: Experts,
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    cache: LatentCache | None,
) -> torch.Tensor:
    """`Experts.forward` for T <= FEW_TOKENS tokens (decoding, a speculative verification) without the sort, gather
    and scatter: the same sum, token by token and expert by expert, since at a few tokens the dispatch glue, not the
    arithmetic, is what costs. The weights come transposed, as `ExpertDispatch.compute` takes them, unbound into one
    tensor per expert (kept by the cache when there is one)."""
    gate_up_t, down_t = transposed_experts(experts, cache)

    def unbind():
        return gate_up_t.unbind(0), down_t.unbind(0)

    gate_up_e, down_e = (
        unbind()
        if cache is None
        else cache.derived((id(experts), "per expert"), lambda: (experts.gate_up_proj, experts.down_proj), unbind)
    )
    N = experts.n_ffn
    # The block's host syncs (ids and weights as Python numbers): each expert's weight then rides in addmm's
    # alpha, so one op adds a weighted expert, and the zero experts' total weight scales x once.
    rows = (x_TD,) if x_TD.shape[0] == 1 else x_TD.split(1)
    outs = []
    for x_1D, ids, weights in zip(rows, topk_ids_TK.tolist(), topk_weights_TK.tolist()):
        choices = list(zip(ids, weights))
        out_1D = x_1D * sum(w for e, w in choices if e >= N)
        for e, w in choices:
            if e < N:
                gate, up = (x_1D @ gate_up_e[e]).chunk(2, dim=-1)
                out_1D = torch.addmm(out_1D, F.silu(gate) * up, down_e[e], alpha=w)
        outs.append(out_1D)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# MoE -----------------------------------------------------------------------------------------------------------
class MoE(nn.Module):
    """MoE(u) = sum over chosen i of gamma * p_i * E_i(u), E_i a SwiGLU expert (i < N) or the identity (paper Eq. 1).

    Runs in three steps so that the layer can overlap the experts with dense work (docs/design.md §1.1): `start`
    routes and hands the tokens to `dispatcher` (`LocalDispatcher` unless `longcat_lab.parallel` swapped it),
    `compute` runs the experts, `finish` returns the output and the `LayerRouting`. `forward` does all three."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_ffn = config.n_routed_experts
        self.router = Router(config)
        self.experts = Experts(config)
        self.dispatcher = LocalDispatcher()

    def start(self, u: torch.Tensor, cache: LatentCache | None = None) -> MoEPending:
        """Route u [B, S, D] and start the dispatch. A decoding `cache` lends the experts its transposed weights."""
        B, S, D = u.shape
        u_TD = u.reshape(B * S, D)
        with region("ep.router"):
            routed = self.router(u_TD)
        return MoEPending(u_TD, routed, (B, S, D), self.dispatcher.start(self, u_TD, routed, cache))

    def compute(self, pending: MoEPending) -> MoEPending:
        """Run the experts on the dispatched tokens; a no-op when they already ran."""
        if not pending.computed:
            pending.state = self.dispatcher.compute(self, pending)
            pending.computed = True
        return pending

    def finish(self, pending: MoEPending, return_routing: bool = True) -> tuple[torch.Tensor, LayerRouting | None]:
        """(MoE(u) [B, S, D], the block's `LayerRouting`, or None when return_routing is False: decoding skips
        building it)."""
        B, S, D = pending.shape
        out_BSD = self.dispatcher.finish(self, self.compute(pending)).view(B, S, D)
        if not return_routing:
            return out_BSD, None
        return out_BSD, LayerRouting.from_router(pending.routed, self.n_ffn, B, S)

    def forward(
        self, u: torch.Tensor, return_routing: bool = True, cache: LatentCache | None = None
    ) -> tuple[torch.Tensor, LayerRouting | None]:
        return self.finish(self.compute(self.start(u, cache)), return_routing)
