"""A scaled-down LongCat-Flash, read top-down like the paper (arXiv 2509.01322; design notes: docs/design.md).

Notable features, with the paper section each implements:
- MLA attention with the scale correction alpha_q = sqrt(d/d_q), alpha_kv = sqrt(d/d_kv), applied after the latent
  RMSNorms as transformers does (paper 2.3.1, Eq. 6-7; docs/design.md §1.1). Interleaved-pair RoPE as in transformers.
- Zero-computation experts: Z identity experts scored beside N SwiGLU experts, so the number of FFN experts a token
  uses varies (paper 2.1, Eq. 1). They own no weights and cost no FLOPs.
- Expert bias: a buffer added to the router probabilities for top-k *selection only*; weights are
  routed_scaling_factor * probability (paper 2.1.1 Eq. 2, 2.3.2 Eq. 8; docs/design.md D2). The controller that moves
  the bias lives outside forward (`longcat_lab.train.control`); forward only counts tokens per expert while training.
- Shortcut-connected MoE layer: two attention blocks, two dense FFNs, and one MoE that reads the normalised output
  of the first attention and joins at the end of the layer (paper 2.2; docs/design.md §1), with "vanilla" and
  "dense" ablations. The MoE runs as start / compute / finish behind a swappable token dispatcher
  (`longcat_lab.model.dispatch`), so expert parallelism reuses this layer.
- Sort-based expert dispatch: one host sync per MoE block (the slice sizes), none per expert; the grouped kernel
  with its own backward is `longcat_lab.model.ops.expert_dispatch`.
- A KV cache that stores the MLA latent (c_KV and the rotated shared key) rather than full keys and values;
  decoding one position attends in latent space with W_UK and W_UV absorbed, inside the same `forward`, so the
  layer wiring exists once (`longcat_lab.inference`: the cache, the decoding branches, generation).

Shape legend inside the MoE code: B batch, S sequence, T tokens (B*S), D model dim, F expert hidden, E = N + Z
experts, N FFN experts, Z zero experts, K top-k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab._util import check_choice
from longcat_lab.model.config import IGNORE_INDEX, ModelConfig
from longcat_lab.model.dispatch import region
from longcat_lab.model.moe import MoE
from longcat_lab.model.routing import LayerRouting, Routing
from longcat_lab.perf import accounting

# `longcat_lab.inference` builds on this module (it imports the model classes), so this module reaches it inside
# the methods that decode or generate rather than at import time.
if TYPE_CHECKING:
    from longcat_lab.inference.cache import LatentCache

# transformers hard-codes this eps for the MLA latent norms (docs/design.md D1, §11.3).
LATENT_NORM_EPS = 1e-6


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
def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query i may attend key j: j <= i and both in the same segment (block-diagonal
    causal, docs/design.md §17). RoPE scores depend only on j - i, so positions need not restart per segment."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    S = segment_ids.shape[1]
    return (same & torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril())[:, None]


class MLA(nn.Module):
    """Multi-head latent attention with scale correction (paper Eq. 6-7, docs/design.md §1.1):
    c_Q = RMSNorm(W_DQ h); q = alpha_q W_UQ c_Q; [c, k_R] = W_DKV h; c_KV = alpha_kv RMSNorm(c); [k_C, v] = W_UKV c_KV;
    score = [q_C; RoPE(q_R)] . [k_C; RoPE(k_R)] / sqrt(qk_head_dim), causal softmax, out = W_O o.

    One new position against a `LatentCache` without gradients (or a few after a cached prefix, a speculative
    verification: `LatentCache.absorbs`) takes the absorbed form instead, W_UK folded into the query map and W_UV
    into the output map (`longcat_lab.inference.decode.absorbed_attention`)."""

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
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
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
            from longcat_lab.inference.decode import absorbed_attention

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
            # softmax, slower forward and backward on CPU (docs/design.md §15). Zero columns appended to v change
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


# The shortcut-connected layer ----------------------------------------------------------------------------------
EXPERTS_AFTER = ("attn1", "ffn0")  # where a "scmoe" layer runs its experts: after MLA_1, or after FFN_0


class LongCatLayer(nn.Module):
    """One LongCat layer (docs/design.md §1), for layer_style "scmoe":
        h1 = x + MLA_0(N_in0(x));  u = N_post0(h1);  m = MoE(u);  h2 = h1 + FFN_0(u)
        h3 = h2 + MLA_1(N_in1(h2));  y = h3 + FFN_1(N_post1(h3)) + m
    "vanilla" uses the same parts in the conventional order: the MoE reads N_post1(h3), after the second attention,
    so nothing but FFN_1 can run beside it. "dense" replaces the MoE by a SwiGLU of the MoE's activated width.

    The MoE's dispatch starts right after the first attention and its result joins at the end; in between, the
    experts run after FFN_0 or after MLA_1 (`experts_after`, one of `EXPERTS_AFTER`). Where they run changes what
    overlaps what under expert parallelism, never the result."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.style = config.layer_style
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = nn.ModuleList([RMSNorm(D, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(D, eps) for _ in range(2)])
        self.self_attn = nn.ModuleList([MLA(config, 2 * layer_index + i) for i in range(2)])
        self.mlps = nn.ModuleList([SwiGLU(D, config.ffn_hidden_size) for _ in range(2)])
        self.mlp = SwiGLU(D, config.dense_moe_width) if self.style == "dense" else MoE(config)
        self.experts_after = "attn1"

    @property
    def experts_after(self) -> str:
        return self._experts_after

    @experts_after.setter
    def experts_after(self, value: str) -> None:
        check_choice("experts_after", value, EXPERTS_AFTER)
        self._experts_after = value

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        return_routing: bool = True,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LayerRouting | None]:
        moe, routing = self.style != "dense", None
        with region("ep.attn0"):
            h1 = x + self.self_attn[0](self.input_layernorm[0](x), cos, sin, cache, mask)
            u = self.post_attention_layernorm[0](h1)
        if self.style == "scmoe":
            pending = self.mlp.start(u, cache)  # the shortcut: dispatch starts right after the first attention
        with region("ep.ffn0"):
            h2 = h1 + self.mlps[0](u, cache)
        if self.style == "scmoe" and self.experts_after == "ffn0":
            pending = self.mlp.compute(pending)
        with region("ep.attn1"):
            h3 = h2 + self.self_attn[1](self.input_layernorm[1](h2), cos, sin, cache, mask)
            v = self.post_attention_layernorm[1](h3)
        if self.style == "vanilla":
            pending = self.mlp.start(v, cache)  # conventional: must wait for the second attention
        if moe:
            pending = self.mlp.compute(pending)  # a no-op if the experts already ran
        else:  # before FFN_1, as the experts: autograd sums v's four gradients in an order this fixes
            m = self.mlp(v, cache)
        with region("ep.ffn1"):
            f1 = self.mlps[1](v, cache)
        if moe:
            m, routing = self.mlp.finish(pending, return_routing)
        return h3 + f1 + m, routing


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
        self.mtp = None  # the multi-token-prediction module (docs/design.md §5), when the config asks for one
        if config.num_nextn_predict_layers:
            from longcat_lab.model.mtp import MTP  # mtp.py builds on this module's classes

            self.mtp = MTP(config)  # registered last, so the other parameters keep their init order
        from longcat_lab.inference.cache import DecodingWeights

        self.decoding_weights = DecodingWeights()  # what `stream` decodes with; dropped by train()
        self.reset_parameters()

    def train(self, mode: bool = True) -> LongCatLM:
        """As nn.Module.train; entering training mode also drops the weights kept for decoding (`DecodingWeights`),
        which would otherwise hold a second copy of the model through training."""
        if mode:
            self.decoding_weights.clear()
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
    def check_ids(self, name: str, ids: torch.Tensor, past: int = 0, allow_ignore: bool = False) -> None:
        """Raise a ValueError naming `name` unless `ids` are token ids this model accepts after `past` cached
        positions (`ModelConfig.check_ids`; one host sync). `forward` calls it unless told `validate=False`."""
        self.config.check_ids(name, ids, past, allow_ignore)

    # Forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_routing: bool = False,
        cache: LatentCache | None = None,
        logits_to_keep: int = 0,
        validate: bool = True,
        segment_ids: torch.Tensor | None = None,
    ):
        """(logits [B, S, vocab] fp32 (the last `logits_to_keep` positions if > 0), mean loss or None), plus the
        `Routing` record with return_routing=True. `validate=False` skips `check_ids` (its host sync) for ids the
        caller produced or checked itself: the trainer's token streams, generated tokens. `segment_ids` ([B, S]
        ints) keeps packed sequences apart: a position attends only to earlier ones of its own segment."""
        past = cache.seq_len if cache is not None else 0
        if validate:
            self.check_ids("idx", idx, past)
            if targets is not None:
                self.check_ids("targets", targets, allow_ignore=True)
                if targets.shape != idx.shape:
                    raise ValueError(f"targets has shape {tuple(targets.shape)}: expected idx's {tuple(idx.shape)}")
        mask = None
        if segment_ids is not None:
            if cache is not None or segment_ids.shape != idx.shape:
                raise ValueError(
                    f"segment_ids of shape {tuple(segment_ids.shape)} is not allowed: it needs idx's shape "
                    f"{tuple(idx.shape)} and no cache"
                )
            mask = segment_mask(segment_ids)
        if cache is not None:
            cos, sin = cache.angles(self.config, past, idx.shape[1], idx.device)
        else:
            cos, sin = rope_angles(self.config, torch.arange(idx.shape[1], device=idx.device))
        with region("ep.embed"):
            x = self.embed_tokens(idx.long())
        layer_routing = []
        for layer in self.layers:
            x, r = layer(x, cos, sin, cache, return_routing, mask)
            layer_routing.append(r)
        last_hidden = x
        with region("ep.head"):
            h = self.norm(x)
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            if cache is not None and not torch.is_grad_enabled():
                logits = (h @ cache.transposed(self.lm_head)).float()
            else:
                logits = self.lm_head(h).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.shape[-1]), targets.long().reshape(-1), ignore_index=IGNORE_INDEX
            )
        if return_routing:
            return logits, loss, Routing(layer_routing, last_hidden, self.config.n_routed_experts)
        return logits, loss

    # Generation (longcat_lab.inference.generate) --------------------------------------------------------------
    def stream(self, idx: torch.Tensor, max_new_tokens: int, **options) -> Iterator[torch.Tensor]:
        """Yield each new token ([B, 1]) as it is decoded. Options (`temperature`, `top_p`, `generator`,
        `use_cache`, `return_logits`) as in `longcat_lab.inference.generate.stream`."""
        from longcat_lab.inference.generate import stream

        return stream(self, idx, max_new_tokens, **options)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """idx followed by max_new_tokens decoded tokens. Options as in `longcat_lab.inference.generate.generate`."""
        from longcat_lab.inference.generate import generate

        return generate(self, idx, max_new_tokens, **options)

    # Accounting ------------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Every parameter, counted from the module (tests compare it with the closed form in `accounting`)."""
        return sum(p.numel() for p in self.parameters())

    def activated_params(self, ffn_experts_per_token: float | None = None) -> dict[str, float]:
        """Activated parameters per token in the paper's convention; see `accounting.activated_params`."""
        return accounting.activated_params(self.config, ffn_experts_per_token)

    def flops_per_token(self, seq_len: int, ffn_experts_per_token: float | None = None, training: bool = True) -> float:
        return accounting.flops_per_token(self.config, seq_len, ffn_experts_per_token, training)
