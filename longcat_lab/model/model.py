"""A scaled-down LongCat-Flash, read top-down like the paper (arXiv 2509.01322; design notes: docs/design.md): the
shortcut-connected layer and the model. Their parts sit beside this file: `blocks.py` (RMSNorm, the dense SwiGLU
FFN), `rope.py`, `attention.py` (MLA), `moe.py` (router, FFN and zero experts), `mtp.py` (multi-token prediction)
and `cache.py` (the latent KV cache).

Notable features, with the paper section each implements:
- MLA attention with the scale correction alpha_q = sqrt(d/d_q), alpha_kv = sqrt(d/d_kv), applied after the latent
  RMSNorms as transformers does (paper 2.3.1, Eq. 6-7; docs/design.md §1.2). Interleaved-pair RoPE as in transformers.
- Zero-computation experts: Z identity experts scored beside N SwiGLU experts, so the number of FFN experts a token
  uses varies (paper 2.1, Eq. 1). They own no weights and cost no FLOPs.
- Expert bias: a buffer added to the router probabilities for top-k *selection only*; weights are
  routed_scaling_factor * probability (paper 2.1.1 Eq. 2, 2.3.2 Eq. 8; docs/design.md D2). The controller that moves
  the bias lives outside forward (`longcat_lab.train.control`); forward only counts tokens per expert while training.
- Shortcut-connected MoE layer: two attention blocks, two dense FFNs, and one MoE that reads the normalised output
  of the first attention and joins at the end of the layer (paper 2.2; docs/design.md §1.1), with "vanilla" and
  "dense" ablations. The MoE runs as start / compute / finish behind a swappable token dispatcher
  (`longcat_lab.model.dispatch`), so expert parallelism reuses this layer.
- Sort-based expert dispatch: one host sync per MoE block (the slice sizes), none per expert; the grouped kernel
  with its own backward is `longcat_lab.model.ops.expert_dispatch`.
- A KV cache that stores the MLA latent (c_KV and the rotated shared key) rather than full keys and values;
  decoding one position attends in latent space with W_UK and W_UV absorbed (`attention.absorbed_attention`) and
  runs the few chosen experts token by token (`moe.experts_few_tokens`), inside the same `forward`, so the layer
  wiring exists once. The loops that decode (generation, speculative decoding) live in `longcat_lab.inference`.

Shape legend inside the MoE code: B batch, S sequence, T tokens (B*S), D model dim, F expert hidden, E = N + Z
experts, N FFN experts, Z zero experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab._util import check_choice
from longcat_lab.model import accounting
from longcat_lab.model.attention import MLA, segment_mask
from longcat_lab.model.blocks import RMSNorm, SwiGLU
from longcat_lab.model.cache import DecodingWeights, LatentCache
from longcat_lab.model.config import IGNORE_INDEX, ModelConfig
from longcat_lab.model.dispatch import region
from longcat_lab.model.moe import MoE
from longcat_lab.model.mtp import MTP
from longcat_lab.model.rope import rope_angles
from longcat_lab.model.routing import LayerRouting, Routing

# The shortcut-connected layer ----------------------------------------------------------------------------------
EXPERTS_AFTER = ("attn1", "ffn0")  # where a "scmoe" layer runs its experts: after MLA_1, or after FFN_0


class LongCatLayer(nn.Module):
    """One LongCat layer (docs/design.md §1.1), for layer_style "scmoe":
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
@dataclass(frozen=True)
class CausalLMOutput:
    """What `LongCatLM.forward` returns, always the same fields (as transformers' `CausalLMOutputWithPast`):
    `logits` [B, S, vocab] in fp32 (the last `logits_to_keep` positions if asked), the mean `loss` when targets were
    given, and the `Routing` record when `return_routing=True` (else None)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    routing: Routing | None = None


class LongCatLM(nn.Module):
    """Embedding -> num_layers LongCat layers -> RMSNorm -> untied LM head.

    `out = model(idx, targets=targets)`: `out.logits`, `out.loss`, and `out.routing` with `return_routing=True`
    (`CausalLMOutput`). Everything but `idx` is passed by keyword."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LongCatLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = None  # the multi-token-prediction module (docs/design.md §1.5), when the config asks for one
        if config.num_nextn_predict_layers:
            self.mtp = MTP(config)  # registered last, so the other parameters keep their init order
        # What `longcat_lab.inference.generate.stream` decodes with; dropped by train().
        self.decoding_weights = DecodingWeights()
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
        *,
        targets: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        logits_to_keep: int = 0,
        return_routing: bool = False,
        segment_ids: torch.Tensor | None = None,
        validate: bool = True,
    ) -> CausalLMOutput:
        """The `CausalLMOutput` of idx [B, S]: logits (the last `logits_to_keep` positions if > 0), the mean loss
        against `targets` if given, and the `Routing` record with return_routing=True. A `cache` (`LatentCache`)
        holds the positions before idx and receives idx's. `validate=False` skips `check_ids` (its host sync) for ids
        the caller produced or checked itself: the trainer's token streams, generated tokens. `segment_ids` ([B, S]
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
            x, r = layer(x, cos, sin, cache=cache, return_routing=return_routing, mask=mask)
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
        routing = Routing(layer_routing, last_hidden, self.config.n_routed_experts) if return_routing else None
        return CausalLMOutput(logits, loss, routing)

    # Accounting ------------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Every parameter, counted from the module (tests compare it with the closed form in `accounting`)."""
        return sum(p.numel() for p in self.parameters())

    def activated_params(self, ffn_experts_per_token: float | None = None) -> dict[str, float]:
        """Activated parameters per token in the paper's convention; see `accounting.activated_params`."""
        return accounting.activated_params(self.config, ffn_experts_per_token)

    def flops_per_token(self, seq_len: int, ffn_experts_per_token: float | None = None, training: bool = True) -> float:
        return accounting.flops_per_token(self.config, seq_len, ffn_experts_per_token, training)
