"""A scaled-down LongCat-Flash, read top-down like the paper (arXiv 2509.01322; design notes: docs/design.md).

Notable features, with the paper section each implements:
- MLA attention with the scale correction alpha_q = sqrt(d/d_q), alpha_kv = sqrt(d/d_kv), applied after the latent
  RMSNorms as transformers does (paper 2.3.1, Eq. 6-7; docs/design.md §1.1). Interleaved-pair RoPE as in transformers.
- Zero-computation experts: Z identity experts scored beside N SwiGLU experts, so the number of FFN experts a token
  uses varies (paper 2.1, Eq. 1). They own no weights and cost no FLOPs.
- Expert bias: a buffer added to the router probabilities for top-k *selection only*; weights are
  routed_scaling_factor * probability (paper 2.1.1 Eq. 2, 2.3.2 Eq. 8; docs/design.md D2). The controller that moves
  the bias lives outside forward (`longcat_lab.control`); forward only counts tokens per expert while training.
- Shortcut-connected MoE layer: two attention blocks, two dense FFNs, and one MoE that reads the normalised output
  of the first attention and joins at the end of the layer (paper 2.2; docs/design.md §1), with "vanilla" and "dense" ablations.
- Sort-based expert dispatch: one host sync per MoE block (the slice sizes), none per expert.
- A KV cache that stores the MLA latent (c_KV and the rotated shared key) rather than full keys and values;
  decoding one position attends in latent space with W_UK and W_UV absorbed (`MLA.decode`), inside the same
  `forward`, so the layer wiring exists once.

Shape legend inside the MoE code: B batch, S sequence, T tokens (B*S), D model dim, F expert hidden, E = N + Z experts,
N FFN experts, Z zero experts, K top-k.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab.perf import accounting
from longcat_lab.model.config import ModelConfig

# transformers hard-codes this eps for the MLA latent norms (docs/design.md D1, open question 3).
LATENT_NORM_EPS = 1e-6
IGNORE_INDEX = -100


# Norms and positions -------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (as transformers' LongcatFlashRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.rms_norm is w * x * rsqrt(mean(x^2) + eps) in one call, bitwise equal (forward and gradient) to the
        # elementwise ops it replaces, which matters when decoding spends its time in op calls. Below fp32 the weight
        # stays outside, to keep transformers' order: normalise in fp32, cast, then scale.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def rope_angles(config: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, rope_dim/2] for the given positions, in fp32 whatever the model dtype."""
    dim = config.qk_rope_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... and emit them de-interleaved as [even' | odd'], exactly as
    transformers' `apply_rotary_pos_emb_interleave` does (dot products do not care; parity does)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# Attention -----------------------------------------------------------------------------------------------------
class DecodingWeights:
    """Weights rearranged for decoding, each built on first use and rebuilt when a weight it came from changes: a
    different tensor, storage or version counter (every in-place update, an optimizer step included, bumps it).

    What it holds: each MLA block's folded decoding weights (`MLA.absorbed_weights`) and the other weights
    transposed (`transpose`), all as contiguous copies on CPU, where at decoding's few rows a matmul against the
    transposed layout beat F.linear against nn.Linear's [out, in] layout: 1.4x at 8 rows with the weights out of
    cache, 1.5-2.5x with them in cache, the same at one row out of cache (measured, one thread, torch 2.13);
    elsewhere views, as GPU BLAS reads either layout. A `LongCatLM` keeps one store across `generate`
    calls, so the copies are built once; `model.train()` drops them. They cost memory: on CPU about one more
    model's worth of weights while they live."""

    def __init__(self):
        self.entries: dict[tuple, tuple[tuple[tuple[torch.Tensor, int, int], ...], object]] = {}

    def get(self, key: tuple, sources: tuple[torch.Tensor, ...], build):
        """The value `build()` made from `sources` under `key`, rebuilt if any source changed since."""
        stamp = tuple((s, s.data_ptr(), s._version) for s in sources)
        entry = self.entries.get(key)
        if entry is None or any(a[0] is not b[0] or a[1:] != b[1:] for a, b in zip(entry[0], stamp)):
            with torch.no_grad(), torch.inference_mode(False):  # ordinary tensors, usable outside generation too
                entry = self.entries[key] = (stamp, build())
        return entry[1]

    @staticmethod
    def transpose(*weights: torch.Tensor) -> torch.Tensor:
        """The weights stacked along their output dim (-2) and transposed: x @ transpose(W) == F.linear(x, W), a
        contiguous copy on CPU. Stacking the gate and up projections makes them one matmul."""
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights, dim=-2)
        stacked = stacked.detach().transpose(-2, -1)
        return stacked.contiguous() if stacked.device.type == "cpu" else stacked

    def clear(self) -> None:
        self.entries.clear()


class LatentCache:
    """The MLA KV cache: per attention block one buffer [B, capacity, kv_lora_rank + qk_rope_head_dim] holding the
    normalised, scaled latent c_KV and the rotated shared RoPE key k_R side by side, never full keys and values.
    Buffers are preallocated (`capacity`, or grown by doubling), so appending a token copies only that token.

    `update` serves `MLA.forward` (prefill: keys and values re-expanded from the latent); `attend` serves
    `MLA.decode`, absorbed decoding of one new position (queries already mapped into latent space, so nothing is
    re-expanded). `weights` is the `DecodingWeights` store the decoding modules take their weights from: the model's
    own when `LongCatLM.stream` made the cache, else a fresh one. The cache asks the store once per weight and then
    keeps the answer: decoding steps pay a dict lookup, and a cache belongs to the weights it started with, as its
    latents do (a new cache, one per `generate` call, picks up changed weights)."""

    def __init__(self, num_blocks: int, capacity: int | None = None, weights: DecodingWeights | None = None):
        self.buffers: list[torch.Tensor | None] = [None] * num_blocks
        self.lengths = [0] * num_blocks
        self.capacity = capacity
        self.weights = weights if weights is not None else DecodingWeights()
        self._derived: dict[tuple, object] = {}
        self._angles: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rotation: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def angles(self, config: ModelConfig, past: int, length: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope_angles` of positions past..past+length-1, sliced from a table over the cache's capacity (built on
        first use) when the capacity is known: a decoding step then slices instead of recomputing them."""
        if self.capacity is None or past + length > self.capacity:
            return rope_angles(config, torch.arange(past, past + length, device=device))
        if self._angles is None:
            self._angles = rope_angles(config, torch.arange(self.capacity, device=device))
        cos, sin = self._angles
        return cos[past:past + length], sin[past:past + length]

    def derived(self, key: tuple, sources, build):
        """The store's value for `key` (built by `build()` from the tensors `sources()` returns), looked up in the
        store on this cache's first request only."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = self.weights.get(key, sources(), build)
        return value

    def transposed(self, *items: nn.Module | torch.Tensor) -> torch.Tensor:
        """`DecodingWeights.transpose` of the given weights (a module stands for its `.weight`), kept in the store."""
        key = tuple(map(id, items))
        value = self._derived.get(key)
        if value is None:
            weights = tuple(i.weight if isinstance(i, nn.Module) else i for i in items)
            value = self.derived(key, lambda: weights, lambda: DecodingWeights.transpose(*weights))
        return value

    def rotations(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype, kv_rank: int,
                  scale_kv: float) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE at one decoding position as two matrices [kv_rank + rope, kv_rank + rope] for `MLA.decode`:
        [q_C' ; q_R] @ M_q == [q_C' ; RoPE(q_R)] and [c ; k_R] @ M_k == [scale_kv * c ; RoPE(k_R)]. Each is the
        identity (times scale_kv for M_k) with the rotation R in its last block, where x @ R == apply_rope(x, cos, sin)
        (R is apply_rope of the identity, so the rotation is written once). Built once per step (keyed by the step's
        cos tensor, which every block receives) and shared by all blocks, so each block rotates its query and its key
        with one matmul each instead of slicing, rotating and writing back. The zeros off the diagonal add nothing,
        so the kv_rank part comes out exactly as an elementwise product would."""
        if self._rotation is None or self._rotation[0] is not cos:
            rope = cos.shape[-1] * 2
            rotation = apply_rope(torch.eye(rope, dtype=dtype, device=cos.device), cos, sin)
            if self._rotation is None:
                m_q = torch.eye(kv_rank + rope, dtype=dtype, device=cos.device)
                matrices = (m_q, m_q * scale_kv)
            else:  # the previous step's matrices: only their rotation block changes
                matrices = self._rotation[1]
            for m in matrices:
                m[kv_rank:, kv_rank:] = rotation
            self._rotation = (cos, matrices)
        return self._rotation[1]

    @property
    def seq_len(self) -> int:
        return self.lengths[0]

    def append(self, block: int, latent: torch.Tensor) -> torch.Tensor:
        """Store latent [B, S, kv_lora_rank + rope] ([c_KV ; k_R]) after this block's cached positions; return the view
        of every cached position [B, past + S, kv_lora_rank + rope]."""
        start, buf = self.lengths[block], self.buffers[block]
        end = start + latent.shape[1]
        if buf is None or end > buf.shape[1]:
            size = max(end, self.capacity or 0, 2 * buf.shape[1] if buf is not None else 0)
            grown = latent.new_empty(latent.shape[0], size, latent.shape[2])
            if buf is not None:
                grown[:, :start] = buf[:, :start]
            self.buffers[block] = buf = grown
        buf[:, start:end] = latent
        self.lengths[block] = end
        return buf[:, :end]

    def update(self, block: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append c_KV [B, S, kv_lora_rank] and k_R [B, S, rope]; return both over every cached position."""
        cached = self.append(block, torch.cat([c_kv, k_rope], dim=-1))
        return cached.split([c_kv.shape[-1], k_rope.shape[-1]], dim=-1)

    def attend(self, block: int, q_BHC: torch.Tensor, latent_B1C: torch.Tensor, kv_rank: int) -> torch.Tensor:
        """One decoding step of absorbed attention: append the new token's latent, then softmax(q . [c_KV ; k_R])
        over all cached positions, weighted sum of c_KV. q_BHC [B, H, kv_lora_rank + rope] must already hold
        W_UK^T q_C next to the rotated q_R, with the softmax scale folded in. Returns [B, H, kv_lora_rank]."""
        cached = self.append(block, latent_B1C)                             # [B, T, kv_rank + rope]
        probs_BHT = torch.bmm(q_BHC, cached.transpose(1, 2)).softmax(dim=-1)
        return torch.bmm(probs_BHT, cached[..., :kv_rank])

    def bytes_per_token(self) -> int:
        """Cache bytes per token per sequence: (kv_lora_rank + qk_rope_head_dim) * blocks * dtype size."""
        return sum(b.shape[-1] * b.element_size() for b in self.buffers if b is not None)


class MLA(nn.Module):
    """Multi-head latent attention with scale correction (paper Eq. 6-7, docs/design.md §1.1):
    c_Q = RMSNorm(W_DQ h); q = alpha_q W_UQ c_Q; [c, k_R] = W_DKV h; c_KV = alpha_kv RMSNorm(c); [k_C, v] = W_UKV c_KV;
    score = [q_C; RoPE(q_R)] . [k_C; RoPE(k_R)] / sqrt(qk_head_dim), causal softmax, out = W_O o.

    Decoding one position against a `LatentCache` without gradients takes `decode`, the absorbed form (DeepSeek-V2's
    inference trick, valid for the paper's MLA, section 2.3.1): since q_C . k_C = (W_UK^T q_C) . c_KV and
    W_O (p . v) = (W_O W_UV)(p . c_KV), W_UK folds into the query map and W_UV into the output map, and attention
    runs on the cached [c_KV ; k_R] without re-expanding keys and values. Same norms, scales and RoPE."""

    def __init__(self, config: ModelConfig, block_index: int):
        super().__init__()
        c = config
        self.block_index = block_index  # 2 * layer + i: this block's slot in the KV cache, as transformers
        self.num_heads = c.num_attention_heads
        self.nope, self.rope, self.v_dim, self.kv_rank = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                                                          c.kv_lora_rank)
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.scale_q = math.sqrt(c.hidden_size / c.q_lora_rank)
        self.scale_kv = math.sqrt(c.hidden_size / c.kv_lora_rank)
        self.softmax_scale = c.qk_head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        if S == 1 and cache is not None and not torch.is_grad_enabled():
            return self.decode(x, cos, sin, cache)
        H = self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) * self.scale_q
        q = q.view(B, S, H, self.nope + self.rope).transpose(1, 2)            # [B, H, S, nope + rope]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv) * self.scale_kv                       # [B, S, kv_rank]
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)                                  # [B, S, rope], shared by all heads
        if cache is not None:
            c_kv, k_rope = cache.update(self.block_index, c_kv, k_rope)
        total = c_kv.shape[1]
        past = total - S
        kv = self.kv_b_proj(c_kv).view(B, total, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, total, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # queries sit at positions past..past+S-1 and may see every key up to their own position
            allowed = torch.ones(S, total, dtype=torch.bool, device=x.device).tril(diagonal=past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * self.v_dim))

    @torch.no_grad()
    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This block's decoding weights, folded once in float64 and stored in the model dtype: [W_DQ ; W_DKV] (both
        read h), the query map c_Q -> [W_UK^T q_C ; q_R] with alpha_q and the softmax scale inside, and W_O W_UV
        (latent -> output)."""
        H, r = self.num_heads, self.kv_rank
        w_kv = self.kv_b_proj.weight.double().view(H, self.nope + self.v_dim, r)
        w_uk, w_uv = w_kv.split([self.nope, self.v_dim], dim=1)                  # [H, nope, r], [H, v, r]
        w_q = self.q_b_proj.weight.double().view(H, self.nope + self.rope, -1) * (self.scale_q * self.softmax_scale)
        w_q_nope, w_q_rope = w_q.split([self.nope, self.rope], dim=1)
        w_q_latent = torch.einsum("hnr,hnq->hrq", w_uk, w_q_nope)                 # [H, r, q_lora_rank]
        w_query = torch.cat([w_q_latent, w_q_rope], dim=1).reshape(H * (r + self.rope), -1)
        w_out = torch.einsum("dhv,hvr->dhr", self.o_proj.weight.double().view(-1, H, self.v_dim), w_uv)
        w_down = torch.cat([self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight])
        dtype = self.o_proj.weight.dtype
        return w_down, w_query.to(dtype), w_out.reshape(-1, H * r).to(dtype)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """`forward` for one new position per sequence (x [B, 1, D]), in latent space: append this position's
        [c_KV ; RoPE(k_R)] to the cache and attend with the absorbed query over every cached position."""
        B, H, r = x.shape[0], self.num_heads, self.kv_rank
        w_down_t, w_query_t, w_out_t = cache.derived(   # transposed, for the reason `DecodingWeights` gives
            ("absorbed", self.block_index),
            lambda: (self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight, self.q_b_proj.weight,
                     self.kv_b_proj.weight, self.o_proj.weight),
            lambda: tuple(DecodingWeights.transpose(w) for w in self.absorbed_weights()))
        c_q, c_kv, k_rope = (x @ w_down_t).split([w_down_t.shape[1] - r - self.rope, r, self.rope], dim=-1)
        m_q, m_k = cache.rotations(cos, sin, x.dtype, r, self.scale_kv)
        q_BHC = (self.q_a_layernorm(c_q) @ w_query_t).view(B, H, r + self.rope) @ m_q   # [W_UK^T q_C ; RoPE(q_R)]
        latent_B1C = torch.cat([self.kv_a_layernorm(c_kv), k_rope], dim=-1) @ m_k     # [alpha_kv c_KV ; RoPE(k_R)]
        o_BHr = cache.attend(self.block_index, q_BHC, latent_B1C, r)
        return o_BHr.reshape(B, 1, H * r) @ w_out_t


# Dense FFN -----------------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None) -> torch.Tensor:
        if cache is not None and not torch.is_grad_enabled():  # decoding: gate and up in one matmul
            gate, up = (x @ cache.transposed(self.gate_proj, self.up_proj)).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ cache.transposed(self.down_proj)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Router --------------------------------------------------------------------------------------------------------
@dataclass
class LayerRouting:
    """What one MoE block decided, for every token (shapes [B, S, ...])."""

    topk_ids: torch.Tensor               # [B, S, K] chosen experts; ids >= n_routed_experts are zero experts
    topk_weights: torch.Tensor           # [B, S, K] fp32, routed_scaling_factor * probability
    ffn_experts_per_token: torch.Tensor  # [B, S] how many of the K choices are FFN experts
    router_logits: torch.Tensor          # [B, S, E] fp32, attached to the graph (for z-losses)
    router_probs: torch.Tensor           # [B, S, E] fp32 softmax, attached to the graph (for the balance loss)


@dataclass
class Routing:
    """Per-layer routing (None for dense layers) and the last hidden state before the final norm (hidden z-loss)."""

    layers: list[LayerRouting | None]
    last_hidden: torch.Tensor
    n_routed_experts: int


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

    def forward(self, u_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = F.linear(_cast(u_TD, torch.float32), _cast(self.classifier.weight, torch.float32))
        probs_TE = logits_TE.softmax(dim=-1)
        with torch.no_grad():
            if self.force_balanced:
                T = u_TD.shape[0]
                slots_TK = torch.arange(T, device=u_TD.device)[:, None] * self.top_k + torch.arange(
                    self.top_k, device=u_TD.device)
                topk_ids_TK = slots_TK % self.num_experts
            else:
                topk_ids_TK = torch.topk(probs_TE + self.e_score_correction_bias, self.top_k, dim=-1).indices
            if self.training:
                self.expert_counts += torch.bincount(topk_ids_TK.flatten(), minlength=self.num_experts)
        topk_weights_TK = probs_TE.gather(1, topk_ids_TK) * self.scale
        return topk_ids_TK, topk_weights_TK, logits_TE, probs_TE


# Experts -------------------------------------------------------------------------------------------------------
class _Scratch(threading.local):
    """Reusable CPU buffers for the dispatch's large temporaries, one set per thread.

    On CPU a fresh multi-megabyte tensor is returned to the OS when freed, so every step pays page faults to get it
    back: filling a fresh [P, D] buffer cost about four times as long as filling a reused one (measured, one thread).
    Only temporaries that die inside one forward or one backward live here, never tensors saved for backward, so
    any number of forwards may run before their backwards. Other devices have caching allocators already, and
    requests above `MAX_BYTES` are allocated normally, so a huge evaluation batch does not pin its memory."""

    MAX_BYTES = 256 * 2**20

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        if like.device.type != "cpu" or numel * like.element_size() > self.MAX_BYTES:
            return like.new_empty(shape)
        key = (name, like.dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor, usable both inside and outside inference mode
                buffer = self.buffers[key] = torch.empty(numel, dtype=like.dtype)
        return buffer[:numel].view(shape)


_scratch = _Scratch()


class ExpertDispatch(torch.autograd.Function):
    """out_TD[t] = sum over the pairs p of token t: w_p * SwiGLU_{e_p}(x_TD[t]), for pairs already sorted by expert.

    Gather, grouped SwiGLU, routing weight and scatter-add in one autograd node with a hand-written backward, because
    they are where the block's time outside the GEMMs goes. What that buys (profiled):
    - the routing weight scales the F-wide activation before the down projection, not the D-wide output after it;
    - the elementwise SwiGLU work runs once over all pairs, not once per expert (fewer op calls), and the backward
      uses torch's fused `silu_backward` with the forward's activations saved, not recomputed;
    - plain autograd over per-expert slices spends a fifth of the block concatenating and stacking gradients; here
      each expert's weight gradient is written straight into its row of the stacked gradient.
    Computes in the autocast dtype when autocast is on, as nn.Linear would."""

    @staticmethod
    def compute(x_TD: torch.Tensor, token_idx_P: torch.Tensor, weights_P: torch.Tensor, gate_up_t: torch.Tensor,
                down_t: torch.Tensor, sizes: list[int],
                save: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The forward arithmetic: (out_TD, with `save` what backward needs in the compute dtype, else ()). The
        expert weights come transposed, gate_up_t [N, D, 2F] and down_t [N, F, D]: views of the parameters when
        training, contiguous copies from a `LatentCache` when decoding. `Experts` calls this directly when no
        gradient is wanted, which skips the autograd.Function machinery."""
        device = x_TD.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
        with torch.autocast(device_type=device, enabled=False):
            x_PD = _cast(x_TD, dtype).index_select(0, token_idx_P)        # each pair's input, sorted by expert
            w_P1 = _cast(weights_P, dtype)[:, None]
            w_gu_t, w_d_t = _cast(gate_up_t, dtype), _cast(down_t, dtype)
            f = w_d_t.shape[1]
            # Every expert's weights and rows by unbind and split, one call per tensor, not one slice per expert: at
            # decoding sizes the loop's op calls, not its arithmetic, are what costs.
            gate_up_e, down_e = w_gu_t.unbind(0), w_d_t.unbind(0)
            used, rows = used_experts(sizes)
            h_P2F = x_PD.new_empty(x_PD.shape[0], 2 * f)                 # [gate | up] pre-activations
            for e, x_e, h_e in zip(used, x_PD.split(rows), h_P2F.split(rows)):
                torch.mm(x_e, gate_up_e[e], out=h_e)
            gate, up = h_P2F[:, :f], h_P2F[:, f:]
            silu_PF = F.silu(gate)
            scaled_PF = silu_PF * w_P1                                   # the routing weight, folded in at width F
            act_PF = scaled_PF * up
            y_PD = _scratch.get("y", (x_PD.shape[0], w_d_t.shape[2]), x_PD)
            for e, act_e, y_e in zip(used, act_PF.split(rows), y_PD.split(rows)):
                torch.mm(act_e, down_e[e], out=y_e)
            out_TD = x_PD.new_zeros(x_TD.shape[0], w_d_t.shape[2]).index_add_(0, token_idx_P, y_PD)
        if not save:
            return out_TD, ()
        # backward wants the weights in the parameters' own layout: [N, 2F, D] and [N, D, F]
        w_gu, w_d = w_gu_t.transpose(1, 2), w_d_t.transpose(1, 2)
        return out_TD, (x_PD, token_idx_P, w_P1, w_gu, w_d, h_P2F, silu_PF, scaled_PF, act_PF)

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_idx_P: torch.Tensor, weights_P: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        out_TD, saved = ExpertDispatch.compute(x_TD, token_idx_P, weights_P, gate_up_proj.transpose(1, 2),
                                               down_proj.transpose(1, 2), sizes, save=True)
        ctx.sizes, ctx.n_tokens = sizes, x_TD.shape[0]
        ctx.dtypes = (x_TD.dtype, weights_P.dtype, gate_up_proj.dtype)
        ctx.save_for_backward(*saved)
        return out_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, grad_out_TD: torch.Tensor):
        x_PD, token_idx_P, w_P1, w_gu, w_d, h_P2F, silu_PF, scaled_PF, act_PF = ctx.saved_tensors
        x_dtype, w_dtype, param_dtype = ctx.dtypes
        f = w_d.shape[2]
        used, rows = used_experts(ctx.sizes)
        grad_y_PD = torch.index_select(grad_out_TD.to(x_PD.dtype), 0, token_idx_P,
                                       out=_scratch.get("grad_y", x_PD.shape, x_PD))
        # empty, not zeros: every used expert's rows are overwritten below, and zero-filling the whole stacked
        # gradient cost ~8% of the block (profiled); only unused experts get explicit zeros.
        grad_gu, grad_d = torch.empty_like(w_gu), torch.empty_like(w_d)
        for e, size in enumerate(ctx.sizes):
            if not size:
                grad_gu[e].zero_()
                grad_d[e].zero_()
        w_gu_e, w_d_e, grad_gu_e, grad_d_e = w_gu.unbind(0), w_d.unbind(0), grad_gu.unbind(0), grad_d.unbind(0)
        grad_act_PF = _scratch.get("grad_act", act_PF.shape, act_PF)
        for e, g_e, act_e, grad_act_e in zip(used, grad_y_PD.split(rows), act_PF.split(rows), grad_act_PF.split(rows)):
            torch.mm(g_e.t(), act_e, out=grad_d_e[e])
            torch.mm(g_e, w_d_e[e], out=grad_act_e)
        gate, up = h_P2F[:, :f], h_P2F[:, f:]
        grad_h_P2F = _scratch.get("grad_h", h_P2F.shape, h_P2F)
        grad_gate, grad_up = grad_h_P2F[:, :f], grad_h_P2F[:, f:]
        torch.mul(grad_act_PF, scaled_PF, out=grad_up)                  # d/d up
        grad_scaled_PF = grad_act_PF.mul_(up)                           # d/d (w * silu(gate)), in place
        grad_w_P = torch.mul(grad_scaled_PF, silu_PF, out=grad_gate).sum(-1)  # d/d w (grad_gate as scratch)
        torch.ops.aten.silu_backward.grad_input(grad_scaled_PF.mul_(w_P1), gate, grad_input=grad_gate)
        grad_x_PD = grad_y_PD                                           # its rows are dead once read: reuse them
        for e, grad_h_e, x_e, grad_x_e in zip(used, grad_h_P2F.split(rows), x_PD.split(rows), grad_x_PD.split(rows)):
            torch.mm(grad_h_e.t(), x_e, out=grad_gu_e[e])
            torch.mm(grad_h_e, w_gu_e[e], out=grad_x_e)
        grad_x_TD = grad_x_PD.new_zeros(ctx.n_tokens, x_PD.shape[1]).index_add_(0, token_idx_P, grad_x_PD)
        return (grad_x_TD.to(x_dtype), None, grad_w_P.to(w_dtype), grad_gu.to(param_dtype), grad_d.to(param_dtype),
                None)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipping the call when it would be a no-op (decoding counts op calls)."""
    return t if t.dtype == dtype else t.to(dtype)


def used_experts(sizes: list[int]) -> tuple[list[int], list[int]]:
    """(the experts with at least one row, their row counts) from every expert's row count."""
    used = [e for e, size in enumerate(sizes) if size]
    return used, [sizes[e] for e in used]


class Experts(nn.Module):
    """N SwiGLU experts as stacked weights (gate and up fused, as transformers 5.x) and Z identity experts with none.

    Dispatch: sort the T*K (token, expert) pairs by expert, run each FFN expert on its contiguous slice, scale by the
    pair's weight and scatter-add back; the zero experts add weight * x in one elementwise step. Without gradients the
    grouped kernel runs outside autograd, and a single token (batch-1 decoding) skips the sort: each chosen expert
    runs on it directly, since at one token the dispatch glue, not the arithmetic, is what costs. Given a decoding
    `LatentCache` (and no gradients), the weights come from its transposed copies (`LatentCache.transposed`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        N, D, F_ = config.n_routed_experts, config.hidden_size, config.expert_ffn_hidden_size
        self.n_ffn = N
        self.gate_up_proj = nn.Parameter(torch.empty(N, 2 * F_, D))  # per expert [gate ; up], Linear layout
        self.down_proj = nn.Parameter(torch.empty(N, D, F_))

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                cache: LatentCache | None = None) -> torch.Tensor:
        K = topk_ids_TK.shape[1]
        N = self.n_ffn
        grad = torch.is_grad_enabled()
        if x_TD.shape[0] == 1 and not grad:
            gate_up_t, down_t = self._transposed(cache)

            def unbind():
                return gate_up_t.unbind(0), down_t.unbind(0)
            per_expert = unbind() if cache is None else cache.derived(
                (id(self), "per expert"), lambda: (self.gate_up_proj, self.down_proj), unbind)
            return self.forward_one_token(x_TD, topk_ids_TK, topk_weights_TK, *per_expert)
        ids_P = topk_ids_TK.reshape(-1)                               # P = T*K pairs
        order_P = torch.argsort(ids_P, stable=True)                   # FFN experts (ids < N) sort first
        counts_N = torch.bincount(ids_P, minlength=N + 1)[:N]
        sizes = counts_N.tolist()                                     # the block's one host sync: slice sizes
        n_pairs = sum(sizes)
        pair_idx = order_P[:n_pairs]
        token_idx = pair_idx // K
        zero_weight_T1 = topk_weights_TK.masked_fill(topk_ids_TK < N, 0.0).sum(dim=-1, keepdim=True)
        out_TD = _cast(zero_weight_T1, x_TD.dtype) * x_TD
        if not n_pairs:
            return out_TD
        weights_P = topk_weights_TK.reshape(-1)[pair_idx]
        if grad:
            return out_TD + ExpertDispatch.apply(x_TD, token_idx, weights_P, self.gate_up_proj, self.down_proj, sizes)
        return out_TD + _cast(ExpertDispatch.compute(x_TD, token_idx, weights_P, *self._transposed(cache), sizes)[0],
                              x_TD.dtype)

    def _transposed(self, cache: LatentCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert weights transposed, [N, D, 2F] and [N, F, D], for the no-gradient paths: the decoding cache's
        contiguous copies when there is a cache, else views of the parameters."""
        if cache is not None:
            return cache.transposed(self.gate_up_proj), cache.transposed(self.down_proj)
        return self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2)

    def forward_one_token(self, x_1D: torch.Tensor, topk_ids_1K: torch.Tensor, topk_weights_1K: torch.Tensor,
                          gate_up_t: tuple[torch.Tensor, ...], down_t: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`forward` for T = 1 without the sort, gather and scatter: the same sum, expert by expert. The weights
        come transposed, as `ExpertDispatch.compute` takes them, and already unbound into one tensor per expert."""
        N = self.n_ffn
        # The block's host syncs (ids and weights as Python numbers): each expert's weight then rides in addmm's
        # alpha, so one op adds a weighted expert, and the zero experts' total weight scales x once.
        choices = list(zip(topk_ids_1K[0].tolist(), topk_weights_1K[0].tolist()))
        out_1D = x_1D * sum(w for e, w in choices if e >= N)
        for e, w in choices:
            if e < N:
                gate, up = (x_1D @ gate_up_t[e]).chunk(2, dim=-1)
                out_1D = torch.addmm(out_1D, F.silu(gate) * up, down_t[e], alpha=w)
        return out_1D


class MoE(nn.Module):
    """MoE(u) = sum over chosen i of gamma * p_i * E_i(u), E_i a SwiGLU expert (i < N) or the identity (paper Eq. 1)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_ffn = config.n_routed_experts
        self.router = Router(config)
        self.experts = Experts(config)

    def forward(self, u: torch.Tensor, return_routing: bool = True,
                cache: LatentCache | None = None) -> tuple[torch.Tensor, LayerRouting | None]:
        """(MoE(u), the block's `LayerRouting`, or None when return_routing is False: decoding skips building it).
        A decoding `cache` lends the experts its transposed weights."""
        B, S, D = u.shape
        u_TD = u.reshape(B * S, D)
        topk_ids_TK, topk_weights_TK, logits_TE, probs_TE = self.router(u_TD)
        out_TD = self.experts(u_TD, topk_ids_TK, topk_weights_TK, cache)
        if not return_routing:
            return out_TD.view(B, S, D), None
        routing = LayerRouting(
            topk_ids=topk_ids_TK.view(B, S, -1),
            topk_weights=topk_weights_TK.view(B, S, -1),
            ffn_experts_per_token=(topk_ids_TK < self.n_ffn).sum(-1).view(B, S),
            router_logits=logits_TE.view(B, S, -1),
            router_probs=probs_TE.view(B, S, -1),
        )
        return out_TD.view(B, S, D), routing


# The shortcut-connected layer ----------------------------------------------------------------------------------
class LongCatLayer(nn.Module):
    """One LongCat layer (docs/design.md §1), for layer_style "scmoe":
        h1 = x + MLA_0(N_in0(x));  u = N_post0(h1);  m = MoE(u);  h2 = h1 + FFN_0(u)
        h3 = h2 + MLA_1(N_in1(h2));  y = h3 + FFN_1(N_post1(h3)) + m
    "vanilla" uses the same parts in the conventional order: the MoE reads N_post1(h3), after the second attention,
    so nothing but FFN_1 can run beside it. "dense" replaces the MoE by a SwiGLU of the MoE's activated width."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.style = config.layer_style
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = nn.ModuleList([RMSNorm(D, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(D, eps) for _ in range(2)])
        self.self_attn = nn.ModuleList([MLA(config, 2 * layer_index + i) for i in range(2)])
        self.mlps = nn.ModuleList([SwiGLU(D, config.ffn_hidden_size) for _ in range(2)])
        self.mlp = SwiGLU(D, config.dense_moe_width) if self.style == "dense" else MoE(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                return_routing: bool = True) -> tuple[torch.Tensor, LayerRouting | None]:
        h1 = x + self.self_attn[0](self.input_layernorm[0](x), cos, sin, cache)
        u = self.post_attention_layernorm[0](h1)
        routing = None
        if self.style == "scmoe":
            m, routing = self.mlp(u, return_routing, cache)   # the shortcut: starts right after the first attention
        h2 = h1 + self.mlps[0](u, cache)
        h3 = h2 + self.self_attn[1](self.input_layernorm[1](h2), cos, sin, cache)
        v = self.post_attention_layernorm[1](h3)
        if self.style == "vanilla":
            m, routing = self.mlp(v, return_routing, cache)   # conventional: must wait for the second attention
        elif self.style == "dense":
            m = self.mlp(v, cache)
        return h3 + self.mlps[1](v, cache) + m, routing


# The model -----------------------------------------------------------------------------------------------------
class LongCatLM(nn.Module):
    """Embedding -> num_layers LongCat layers -> RMSNorm -> untied LM head.

    `logits, loss = model(idx, targets)`; with `return_routing=True` also the `Routing` record."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LongCatLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._decoding_weights = DecodingWeights()   # what `stream` decodes with; dropped by train()
        self.reset_parameters()

    def train(self, mode: bool = True) -> LongCatLM:
        """As nn.Module.train; entering training mode also drops the weights kept for decoding (`DecodingWeights`),
        which would otherwise hold a second copy of the model through training."""
        if mode:
            self._decoding_weights.clear()
        return super().train(mode)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router bias (as transformers)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".input_layernorm." in name or ".post_attention_layernorm." in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.router.e_score_correction_bias.zero_()
                layer.mlp.router.expert_counts.zero_()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def moe_blocks(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    # Input checks ----------------------------------------------------------------------------------------------
    def _check_ids(self, name: str, ids: torch.Tensor, past: int = 0, allow_ignore: bool = False) -> None:
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}: expected 2 dims (batch, sequence)")
        if ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{name} has dtype {ids.dtype}: expected an integer dtype such as torch.long")
        if ids.shape[1] == 0:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}: the sequence is empty")
        limit = self.config.max_position_embeddings
        if past + ids.shape[1] > limit:
            raise ValueError(f"{name}: {past} cached + {ids.shape[1]} new positions exceed "
                             f"max_position_embeddings={limit}")
        lo, hi = (int(v) for v in torch.aminmax(ids.long()))
        low_ok = lo >= 0 or (allow_ignore and lo == IGNORE_INDEX and not bool((ids < -100).any()))
        if not low_ok or hi >= self.config.vocab_size:
            allowed = f"0..{self.config.vocab_size - 1}" + (f" (or {IGNORE_INDEX} to ignore)" if allow_ignore else "")
            raise ValueError(f"{name} holds token ids from {lo} to {hi}; allowed ids are {allowed}")

    # Forward ---------------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_routing: bool = False,
                cache: LatentCache | None = None, logits_to_keep: int = 0):
        past = cache.seq_len if cache is not None else 0
        self._check_ids("idx", idx, past)
        if targets is not None:
            self._check_ids("targets", targets, allow_ignore=True)
            if targets.shape != idx.shape:
                raise ValueError(f"targets has shape {tuple(targets.shape)}: expected idx's {tuple(idx.shape)}")
        return self._forward_checked(idx.long(), targets, return_routing, cache, logits_to_keep)

    def _forward_checked(self, idx: torch.Tensor, targets: torch.Tensor | None, return_routing: bool,
                         cache: LatentCache | None, logits_to_keep: int):
        """`forward` after its input checks (`stream` calls it directly for tokens it generated itself)."""
        if cache is not None:
            cos, sin = cache.angles(self.config, cache.seq_len, idx.shape[1], idx.device)
        else:
            cos, sin = rope_angles(self.config, torch.arange(idx.shape[1], device=idx.device))
        x = self.embed_tokens(idx)
        layer_routing = []
        for layer in self.layers:
            x, r = layer(x, cos, sin, cache, return_routing)
            layer_routing.append(r)
        last_hidden = x
        h = self.norm(x)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if cache is not None and not torch.is_grad_enabled():
            logits = (h @ cache.transposed(self.lm_head)).float()
        else:
            logits = self.lm_head(h).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.long().reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        if return_routing:
            return logits, loss, Routing(layer_routing, last_hidden, self.config.n_routed_experts)
        return logits, loss

    # Generation ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None, use_cache: bool = True,
               return_logits: bool = False) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Yield each new token ([B, 1]) as it is decoded; greedy at temperature 0, else top-p sampling. With
        return_logits=True yield (token, logits [B, vocab] in fp32, before temperature) instead.

        With the cache, the prompt goes through `forward` once, filling the latent cache, and every later token is one
        more `forward` of that single position against the cache, in which each MLA block takes its absorbed
        decoding step (`MLA.decode`) and the MoE its no-grad expert path: the wiring is `LongCatLayer.forward`'s
        own. Without the cache every step recomputes the whole sequence (the slow, obviously-correct reference).
        Runs in inference mode (cheaper per op than no_grad), so the yielded tensors are inference tensors: clone one
        before modifying it in place outside inference mode. The prompt is checked once; later steps skip
        `forward`'s id checks (their host syncs), since generated ids are in range by construction."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed: it must be an integer >= 0")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature!r} is not allowed: it must be a finite number >= 0")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p={top_p!r} is not allowed: it must be in (0, 1]")
        self._check_ids("idx", idx)
        limit = self.config.max_position_embeddings
        if idx.shape[1] + max_new_tokens > limit:
            raise ValueError(f"prompt length {idx.shape[1]} + max_new_tokens={max_new_tokens} exceeds "
                             f"max_position_embeddings={limit}")
        was_training = self.training
        self.eval()
        try:
            # A fresh cache per call, lending the model's decoding weights (rebuilt where a weight has changed).
            cache = LatentCache(2 * self.config.num_layers, idx.shape[1] + max_new_tokens,
                                self._decoding_weights) if use_cache else None
            seq = inputs = idx.long()
            for _ in range(max_new_tokens):
                logits = self._forward_checked(inputs, None, False, cache, 1)[0][:, -1]
                token = sample_next(logits, temperature, top_p, generator)
                yield (token, logits) if return_logits else token
                if cache is None:
                    seq = inputs = torch.cat([seq, token], dim=1)
                else:
                    inputs = token
        finally:
            nn.Module.train(self, was_training)   # not self.train: keep the decoding weights for the next call

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return idx followed by max_new_tokens decoded tokens ([B, S + max_new_tokens]); with return_logits=True
        also the logits each token was drawn from ([B, max_new_tokens, vocab], fp32)."""
        steps = list(self.stream(idx, max_new_tokens, temperature, top_p, generator, use_cache, return_logits))
        tokens = [s[0] for s in steps] if return_logits else steps
        ids = torch.cat([idx.long(), *tokens], dim=1)
        if not return_logits:
            return ids
        vocab = self.config.vocab_size
        logits = torch.stack([s[1] for s in steps], dim=1) if steps else ids.new_zeros(ids.shape[0], 0, vocab).float()
        return ids, logits

    # Accounting ------------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Every parameter, counted from the module (tests compare it with the closed form in `accounting`)."""
        return sum(p.numel() for p in self.parameters())

    def activated_params(self, ffn_experts_per_token: float | None = None) -> dict[str, float]:
        """Activated parameters per token in the paper's convention; see `accounting.activated_params`."""
        return accounting.activated_params(self.config, ffn_experts_per_token)

    def flops_per_token(self, seq_len: int, ffn_experts_per_token: float | None = None,
                        training: bool = True) -> float:
        return accounting.flops_per_token(self.config, seq_len, ffn_experts_per_token, training)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax at temperature 0; otherwise sample from the smallest set of tokens whose probability mass
    reaches top_p (always at least the most likely one). Returns [B, 1] token ids."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)
