"""Multi-token prediction (paper 2.4, 6.1.2; docs/design.md §1.5): one extra predictor that, from the main model's
hidden state at position t and the token at t+1, predicts the token at t+2. It is what speculative decoding drafts
with (`longcat_lab.inference.speculative`).

    g_t = W_eh [ RMSNorm_e(E'(x_{t+1})) ; RMSNorm_h(h_t) ]           (2d -> d)
    g_t = g_t + MLA(N_in(g_t));  g_t = g_t + FFN(N_post(g_t))          (one *dense* decoder layer, no MoE)
    logits_{t+2} = LM_head(RMSNorm(g_t))                               (the main model's LM head)

h_t is the main model's last hidden state *after* its final norm (what its LM head reads), as vLLM and SGLang hand
it to their LongCat MTP; E' is the module's own copy of the embedding. The attention block has its own slot in the
`LatentCache`, index 2 * num_layers (after the main model's 2 * num_layers blocks, as vLLM numbers it).
`mtp_loss` is the training objective: cross-entropy on the token two ahead, which `train.step.forward_backward`
weights per stage (`StageConfig.mtp_loss_weight`). `mtp_logits`, `mtp_loss` and `MTP.start_from` take the main
`LongCatLM` (typed `nn.Module` here, since `model.py` builds on this module): they read its `mtp`, `norm`,
`lm_head` and `embed_tokens`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab.model.attention import MLA, segment_mask
from longcat_lab.model.blocks import RMSNorm, SwiGLU
from longcat_lab.model.cache import LatentCache
from longcat_lab.model.config import IGNORE_INDEX, ModelConfig
from longcat_lab.model.rope import rope_angles


class MTPLayer(nn.Module):
    """The fusion of token and hidden state (eh_proj over enorm and hnorm) and one pre-norm dense decoder layer;
    attribute names follow the release's `model.mtp.layers.0.*` keys (docs/design.md §1.5)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(D, eps)
        self.hnorm = RMSNorm(D, eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = MLA(config, 2 * config.num_layers)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = SwiGLU(D, config.ffn_hidden_size)

    def forward(
        self,
        emb: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        fused = torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1)
        if cache is not None and not torch.is_grad_enabled():  # decoding: the transposed copy, as SwiGLU does
            x = fused @ cache.transposed(self.eh_proj)
        else:
            x = self.eh_proj(fused)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x), cache)


class MTP(nn.Module):
    """The MTP module: its own embedding copy, one `MTPLayer`, a final norm. `forward` returns the normed hidden
    state the main model's LM head turns into logits for the token two ahead."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MTPLayer(config)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def block_index(self) -> int:
        """The MTP attention's slot in a `LatentCache`."""
        return self.layers[0].self_attn.block_index

    def forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        cache: LatentCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [B, S, D]: the main model's normed hidden states at positions p..p+S-1 (p = the MTP's cached
        length); next_ids [B, S]: the tokens one ahead of each; `mask` as `MLA.forward`'s (packed rows). Returns the
        normed MTP hidden states [B, S, D]."""
        S = next_ids.shape[1]
        if cache is not None:
            cos, sin = cache.angles(self.config, cache.lengths[self.block_index], S, next_ids.device)
        else:
            cos, sin = rope_angles(self.config, torch.arange(S, device=next_ids.device))
        x = self.layers[0](self.embed_tokens(next_ids.long()), hidden, cos, sin, cache, mask)
        return self.norm(x)

    @torch.no_grad()
    def start_from(self, model: nn.Module) -> None:
        """Initialise the embedding copy from the main model's embedding (the rest keeps its random init): the
        module then starts from token vectors the main model already learnt, when MTP is added late."""
        self.embed_tokens.weight.copy_(model.embed_tokens.weight)


def mtp_logits(
    model: nn.Module,
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    cache: LatentCache | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, S, vocab] (fp32) for the tokens two ahead: the model's MTP module, then its LM head."""
    if model.mtp is None:
        raise ValueError("the model has no MTP module: build it with num_nextn_predict_layers=1")
    g = model.mtp(hidden, next_ids, cache, mask)
    if cache is not None and not torch.is_grad_enabled():
        return (g @ cache.transposed(model.lm_head)).float()
    return model.lm_head(g).float()


def mtp_loss(
    model: nn.Module, last_hidden: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the MTP's prediction of the token two ahead over a training window.

    last_hidden [B, S, D] is the main model's hidden state before its final norm (`Routing.last_hidden`), targets
    [B, S] the usual next-token targets (targets[t] = x_{t+1}). Position t < S-1 reads norm(h_t) and targets[t] and
    predicts targets[t+1]; a position whose input token is IGNORE_INDEX is ignored too. `segment_ids` ([B, S], packed
    rows) keeps the MTP's attention inside each segment, as the main model's."""
    hidden = model.norm(last_hidden[:, :-1])
    inputs, later = targets[:, :-1].long(), targets[:, 1:].long()
    later = later.masked_fill(inputs == IGNORE_INDEX, IGNORE_INDEX)
    mask = segment_mask(segment_ids[:, :-1]) if segment_ids is not None else None
    logits = mtp_logits(model, hidden, inputs.clamp_min(0), mask=mask)
    # A sum over the counted positions rather than a mean: a window with none left is a 0 loss, not NaN.
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), later.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (later != IGNORE_INDEX).sum().clamp_min(1)


__all__ = ["MTP", "MTPLayer", "mtp_logits", "mtp_loss"]
