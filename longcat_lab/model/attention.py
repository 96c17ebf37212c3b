"""Multi-head latent attention (paper 2.3.1, Eq. 6-7; docs/design.md §1.2), with its decoding form.

`MLA.forward` is the attention of every pass. Without gradients and handed a `LatentCache` for one new position
(or a few after a cached prefix: a speculative verification, `LatentCache.absorbs`), it takes the absorbed form
(`absorbed_attention`): since q_C . k_C = (W_UK^T q_C) . c_KV and W_O (p . v) = (W_O W_UV)(p . c_KV), W_UK folds
into the query map and W_UV into the output map (`absorbed_weights`; DeepSeek-V2's inference trick, valid for the
paper's MLA), and attention runs on the cached [c_KV ; k_R] without re-expanding keys and values. Same norms,
scales and RoPE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab.model.blocks import RMSNorm
from longcat_lab.model.cache import DecodingWeights, LatentCache
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.rope import apply_rope

# transformers hard-codes this eps for the MLA latent norms (docs/design.md D1, §11.3).
LATENT_NORM_EPS = 1e-6


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query i may attend key j: j <= i and both in the same segment (block-diagonal
    causal, docs/design.md §5.4). RoPE scores depend only on j - i, so positions need not restart per segment."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    S = segment_ids.shape[1]
    return (same & torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril())[:, None]


class MLA(nn.Module):
    """Multi-head latent attention with scale correction (paper Eq. 6-7, docs/design.md §1.2):
    c_Q = RMSNorm(W_DQ h); q = alpha_q W_UQ c_Q; [c, k_R] = W_DKV h; c_KV = alpha_kv RMSNorm(c); [k_C, v] = W_UKV c_KV;
    score = [q_C; RoPE(q_R)] . [k_C; RoPE(k_R)] / sqrt(qk_head_dim), causal softmax, out = W_O o.

    One new position against a `LatentCache` without gradients (or a few after a cached prefix, a speculative
    verification: `LatentCache.absorbs`) takes the absorbed form instead, W_UK folded into the query map and W_UV
    into the output map (`absorbed_attention`)."""

    def __init__(self, config: ModelConfig, block_index: int):
        super().__init__()
        c = config
        self.block_index = block_index  # 2 * layer + i: this block's slot in the KV cache, as transformers
        self.num_heads = c.num_attention_heads
        self.nope, self.rope, self.v_dim, self.kv_rank = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            c.kv_lora_rank,
        )
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_latent_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        # mla_scale=False (the Fig. 5a ablation) multiplies by 1.0 instead, so every path keeps one code shape.
        self.scale_q = math.sqrt(c.hidden_size / c.q_lora_rank) if c.mla_scale else 1.0
        self.scale_kv = math.sqrt(c.hidden_size / c.kv_lora_rank) if c.mla_scale else 1.0
        self.softmax_scale = c.qk_head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask` ([B, 1, S, S] bool, True = may attend; `segment_mask`) replaces the causal mask of a pass
        without cache: packed fine-tuning rows, whose dialogues must not see each other."""
        B, S, _ = x.shape
        if cache is not None and not torch.is_grad_enabled() and cache.absorbs(self.block_index, S):
            return absorbed_attention(self, x, cos, sin, cache)
        H = self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) * self.scale_q
        q = q.view(B, S, H, self.nope + self.rope).transpose(1, 2)  # [B, H, S, nope + rope]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv) * self.scale_kv  # [B, S, kv_rank]
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)  # [B, S, rope], shared by all heads
        if cache is not None:
            c_kv, k_rope = cache.update(self.block_index, c_kv, k_rope)
        total = c_kv.shape[1]
        past = total - S
        kv = self.kv_b_proj(c_kv).view(B, total, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, total, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if past == 0:  # causal, or `mask`
            # torch's fused (flash) attention wants one head dim for q, k and v and otherwise runs unfused matmul +
            # softmax, slower forward and backward on CPU (docs/design.md §3.4). Zero columns appended to v change
            # no other output column and are sliced off again.
            pad = q.shape[-1] - self.v_dim
            v_in = F.pad(v, (0, pad)) if pad > 0 else v
            o = F.scaled_dot_product_attention(
                q, k, v_in, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale
            )[..., : self.v_dim]
        else:  # queries sit at positions past..past+S-1 and may see every key up to their own position
            allowed = torch.ones(S, total, dtype=torch.bool, device=x.device).tril(diagonal=past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * self.v_dim))


# Decoding ------------------------------------------------------------------------------------------------------
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


__all__ = ["LATENT_NORM_EPS", "MLA", "absorbed_attention", "absorbed_weights", "segment_mask"]
