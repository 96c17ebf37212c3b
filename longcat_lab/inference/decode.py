"""The no-gradient paths the model's own forward takes when it decodes (docs/design.md §1.1, §10).

`MLA.forward` and `Experts.forward` branch here without gradients, so the layer wiring stays
`LongCatLayer.forward`'s:
- `absorbed_attention`: one new position of MLA against a `LatentCache`, in latent space. Since
  q_C . k_C = (W_UK^T q_C) . c_KV and W_O (p . v) = (W_O W_UV)(p . c_KV), W_UK folds into the query map and W_UV
  into the output map (`absorbed_weights`; DeepSeek-V2's inference trick, valid for the paper's MLA, 2.3.1), and
  attention runs on the cached [c_KV ; k_R] without re-expanding keys and values. Same norms, scales and RoPE.
- `experts_one_token`: the MoE's experts for a single token without the sort, gather and scatter;
  `experts_few_tokens` the same token by token for the few tokens of a speculative verification.
- `transposed_experts`: the expert weights in the layout `ExpertDispatch.compute` takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_lab.inference.cache import DecodingWeights, LatentCache
from longcat_lab.model.model import MLA
from longcat_lab.model.moe import Experts


@torch.no_grad()
def absorbed_weights(mla: MLA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MLA block's decoding weights, folded once in float64 and stored in the model dtype: [W_DQ ; W_DKV] (both
    read h), the query map c_Q -> [W_UK^T q_C ; q_R] with alpha_q and the softmax scale inside, and W_O W_UV
    (latent -> output)."""
    H, r, nope, rope, v_dim = mla.num_heads, mla.kv_rank, mla.nope, mla.rope, mla.v_dim
    w_kv = mla.kv_b_proj.weight.double().view(H, nope + v_dim, r)
    w_uk, w_uv = w_kv.split([nope, v_dim], dim=1)  # [H, nope, r], [H, v, r]
    w_q = mla.q_b_proj.weight.double().view(H, nope + rope, -1) * (mla.scale_q * mla.softmax_scale)
    w_q_nope, w_q_rope = w_q.split([nope, rope], dim=1)
    w_q_latent = torch.einsum("hnr,hnq->hrq", w_uk, w_q_nope)  # [H, r, q_lora_rank]
    w_query = torch.cat([w_q_latent, w_q_rope], dim=1).reshape(H * (r + rope), -1)
    w_out = torch.einsum("dhv,hvr->dhr", mla.o_proj.weight.double().view(-1, H, v_dim), w_uv)
    w_down = torch.cat([mla.q_a_proj.weight, mla.kv_a_proj_with_mqa.weight])
    dtype = mla.o_proj.weight.dtype
    return w_down, w_query.to(dtype), w_out.reshape(-1, H * r).to(dtype)


def absorbed_attention(
    mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache
) -> torch.Tensor:
    """`MLA.forward` for a few new positions per sequence (x [B, S, D]), in latent space: append their
    [c_KV ; RoPE(k_R)] to the cache and attend with the absorbed queries over every cached position (causally among
    the new ones). One position is decoding; a few are a speculative verification (`inference.speculative`)."""
    B, S, H, r, rope = x.shape[0], x.shape[1], mla.num_heads, mla.kv_rank, mla.rope
    w_down_t, w_query_t, w_out_t = cache.derived(  # transposed, for the reason `DecodingWeights` gives
        ("absorbed", mla.block_index),
        lambda: (
            mla.q_a_proj.weight,
            mla.kv_a_proj_with_mqa.weight,
            mla.q_b_proj.weight,
            mla.kv_b_proj.weight,
            mla.o_proj.weight,
        ),
        lambda: tuple(DecodingWeights.transpose(w) for w in absorbed_weights(mla)),
    )
    c_q, c_kv, k_rope = (x @ w_down_t).split([w_down_t.shape[1] - r - rope, r, rope], dim=-1)
    m_q, m_k = cache.rotations(cos, sin, x.dtype, r, mla.scale_kv)
    if S > 1:  # per-position rotations [S, C, C]
        q_BSHC = (mla.q_a_layernorm(c_q) @ w_query_t).view(B, S, H, r + rope) @ m_q
        latent_BSC = (torch.cat([mla.kv_a_layernorm(c_kv), k_rope], dim=-1)[..., None, :] @ m_k).squeeze(-2)
        o_BSHr = cache.attend_many(mla.block_index, q_BSHC, latent_BSC, r)
        return o_BSHr.reshape(B, S, H * r) @ w_out_t
    q_BHC = (mla.q_a_layernorm(c_q) @ w_query_t).view(B, H, r + rope) @ m_q  # [W_UK^T q_C ; RoPE(q_R)]
    latent_B1C = torch.cat([mla.kv_a_layernorm(c_kv), k_rope], dim=-1) @ m_k  # [alpha_kv c_KV ; RoPE(k_R)]
    o_BHr = cache.attend(mla.block_index, q_BHC, latent_B1C, r)
    return o_BHr.reshape(B, 1, H * r) @ w_out_t


# Up to this many tokens the experts run token by token (`experts_few_tokens`) rather than sorted by expert: at a
# handful of tokens the sort's glue costs more than running a shared expert twice.
FEW_TOKENS = 4


def transposed_experts(experts: Experts, cache: LatentCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert weights transposed, [N, D, 2F] and [N, F, D], for the no-gradient paths: the decoding cache's
    contiguous copies when there is a cache, else views of the parameters."""
    if cache is not None:
        return cache.transposed(experts.gate_up_proj), cache.transposed(experts.down_proj)
    return experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)


def experts_one_token(
    experts: Experts,
    x_1D: torch.Tensor,
    topk_ids_1K: torch.Tensor,
    topk_weights_1K: torch.Tensor,
    cache: LatentCache | None,
) -> torch.Tensor:
    """`Experts.forward` for T = 1 without the sort, gather and scatter: the same sum, expert by expert, since at
    one token the dispatch glue, not the arithmetic, is what costs. The weights come transposed, as
    `ExpertDispatch.compute` takes them, unbound into one tensor per expert (kept by the cache when there is one)."""
    return experts_few_tokens(experts, x_1D, topk_ids_1K, topk_weights_1K, cache)


def experts_few_tokens(
    experts: Experts,
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    cache: LatentCache | None,
) -> torch.Tensor:
    """`experts_one_token` for each of T <= FEW_TOKENS tokens (a speculative verification), one after the other."""
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
