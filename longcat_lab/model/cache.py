"""The decoding cache and the weights decoding reads (docs/design.md §1.2, §10): `LatentCache` stores each MLA
block's latent [c_KV ; k_R] instead of full keys and values, and `DecodingWeights` keeps weights rearranged for
few-row matmuls (transposed copies, absorbed MLA maps), rebuilt whenever a source weight changes. The model's
forward takes its decoding branches when handed a cache (`attention.absorbed_attention`, `moe.experts_few_tokens`);
the loops that decode live in `longcat_lab.inference`.
"""

from __future__ import annotations

import torch
from torch import nn

from longcat_lab.model.config import ModelConfig
from longcat_lab.model.rope import apply_rope, rope_angles


class DecodingWeights:
    """Weights rearranged for decoding, each built on first use and rebuilt when a weight it came from changes: a
    different tensor, storage or version counter (every in-place update, an optimizer step included, bumps it).

    What it holds: each MLA block's folded decoding weights (`attention.absorbed_weights`) and the other weights
    transposed (`transpose`), all as contiguous copies on CPU, where at decoding's few rows a matmul against the
    transposed layout is faster than F.linear against nn.Linear's [out, in] layout (benchmarks/RESULTS.md
    "generate"); elsewhere views, as GPU BLAS reads either layout. A `LongCatLM` keeps one store across `generate`
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
    `attention.absorbed_attention`, absorbed decoding of one new position (queries already mapped into latent space,
    so nothing is re-expanded). `weights` is the `DecodingWeights` store the decoding modules take their weights
    from: the model's own when `inference.generate.stream` made the cache, else a fresh one. The cache asks the
    store once per weight and then keeps the answer: decoding steps pay a dict lookup, and a cache belongs to the
    weights it started with, as its latents do (a new cache, one per `generate` call, picks up changed weights)."""

    def __init__(self, num_blocks: int, capacity: int | None = None, weights: DecodingWeights | None = None):
        self.buffers: list[torch.Tensor | None] = [None] * num_blocks
        self.lengths = [0] * num_blocks
        self.capacity = capacity
        self.weights = weights if weights is not None else DecodingWeights()
        self._derived: dict[tuple, object] = {}
        self._angles: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rotation: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._hidden: tuple[tuple[int, int], torch.Tensor] | None = None  # `attend_many`'s causal mask

    def angles(
        self, config: ModelConfig, past: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rope_angles` of positions past..past+length-1, sliced from a table over the cache's capacity (built on
        first use) when the capacity is known: a decoding step then slices instead of recomputing them."""
        if self.capacity is None or past + length > self.capacity:
            return rope_angles(config, torch.arange(past, past + length, device=device))
        if self._angles is None:
            self._angles = rope_angles(config, torch.arange(self.capacity, device=device))
        cos, sin = self._angles
        return cos[past : past + length], sin[past : past + length]

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

    def rotations(
        self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype, kv_rank: int, scale_kv: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE at one decoding position as two matrices [kv_rank + rope, kv_rank + rope] for absorbed decoding:
        [q_C' ; q_R] @ M_q == [q_C' ; RoPE(q_R)] and [c ; k_R] @ M_k == [scale_kv * c ; RoPE(k_R)]. Each is the
        identity (times scale_kv for M_k) with the rotation R in its last block, where x @ R == apply_rope(x, cos, sin)
        (R is apply_rope of the identity, so the rotation is written once). Built once per step (keyed by the step's
        cos tensor, which every block receives) and shared by all blocks, so each block rotates its query and its key
        with one matmul each instead of slicing, rotating and writing back. The zeros off the diagonal add nothing,
        so the kv_rank part comes out exactly as an elementwise product would.

        For S > 1 positions (cos [S, rope/2], a speculative verification) the matrices are [S, C, C], one per
        position, so that [B, S, H, C] @ M_q rotates each position by its own angle."""
        if self._rotation is None or self._rotation[0] is not cos:
            S, rope = cos.shape[0], cos.shape[-1] * 2
            eye = torch.eye(rope, dtype=dtype, device=cos.device)
            if S == 1:
                rotation = apply_rope(eye, cos, sin)
            else:
                rotation = apply_rope(eye.expand(S, rope, rope), cos[:, None], sin[:, None])
            shape = (kv_rank + rope,) * 2 if S == 1 else (S, kv_rank + rope, kv_rank + rope)
            if self._rotation is None or self._rotation[1][0].shape != shape:
                m_q = torch.eye(kv_rank + rope, dtype=dtype, device=cos.device).expand(shape).clone()
                matrices = (m_q, m_q * scale_kv)
            else:  # the previous step's matrices: only their rotation block changes
                matrices = self._rotation[1]
            for m in matrices:
                m[..., kv_rank:, kv_rank:] = rotation
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
        cached = self.append(block, latent_B1C)  # [B, T, kv_rank + rope]
        probs_BHT = torch.bmm(q_BHC, cached.transpose(1, 2)).softmax(dim=-1)
        return torch.bmm(probs_BHT, cached[..., :kv_rank])

    def attend_many(self, block: int, q_BSHC: torch.Tensor, latent_BSC: torch.Tensor, kv_rank: int) -> torch.Tensor:
        """`attend` for S new positions at once (a speculative verification): new position i sees the cached ones
        and the new ones up to itself. Returns [B, S, H, kv_lora_rank]."""
        B, S, H, C = q_BSHC.shape
        cached = self.append(block, latent_BSC)  # [B, T, C]
        T = cached.shape[1]
        scores = torch.bmm(q_BSHC.reshape(B, S * H, C), cached.transpose(1, 2)).view(B, S, H, T)
        if self._hidden is None or self._hidden[0] != (S, T):  # built once per step, shared by the blocks
            hidden = torch.ones(S, T, dtype=torch.bool, device=cached.device).triu(diagonal=T - S + 1)
            self._hidden = ((S, T), hidden[None, :, None])
        probs = scores.masked_fill(self._hidden[1], float("-inf")).softmax(dim=-1)
        return torch.bmm(probs.view(B, S * H, T), cached[..., :kv_rank]).view(B, S, H, kv_rank)

    # Decoding that is a few positions at a time (speculative verification) takes the absorbed path too, while the
    # cache already holds a prefix; a longer chunk or a prompt re-expands keys and values (MLA.forward's own path).
    ABSORB_MAX = 8

    def absorbs(self, block: int, length: int) -> bool:
        """Whether `length` new positions of attention block `block` take `attention.absorbed_attention`."""
        return length == 1 or (length <= self.ABSORB_MAX and self.lengths[block] > 0)

    def truncate(self, length: int, blocks: range | None = None) -> None:
        """Forget every position from `length` on in `blocks` (default all): rejected speculative tokens. The
        buffers stay; the next append overwrites them."""
        for b in blocks if blocks is not None else range(len(self.lengths)):
            self.lengths[b] = min(self.lengths[b], length)

    def bytes_per_token(self) -> int:
        """Cache bytes per token per sequence: (kv_lora_rank + qk_rope_head_dim) * blocks * dtype size."""
        return sum(b.shape[-1] * b.element_size() for b in self.buffers if b is not None)


class BatchLatentCache(LatentCache):
    """The latent cache of a decoding batch whose sequences have different lengths (continuous batching,
    docs/design.md §7.2): row i holds sequence i's [c_KV ; k_R] at positions 0..lengths_i - 1, the rest of the row is
    padding. A forward of one new position per row against it (`idx` [B, 1]) rotates each row's query and key by
    that row's own position and masks each row's padding out of the softmax, so every row computes what decoding it
    alone against a `LatentCache` computes. Only that one-position step is allowed: prompts are prefilled into a
    `LatentCache` and copied in with `add`; `remove` drops a row (the last row moves into its place, so the rows
    stay 0..B-1); `advance` commits the step's tokens after the forward."""

    def __init__(self, num_blocks: int, max_rows: int, weights: DecodingWeights | None = None, capacity: int = 64):
        super().__init__(num_blocks, capacity, weights)
        self.max_rows = max_rows
        self.row_lengths: list[int] = []
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's positions [B] and padding [B,1,T]

    @property
    def rows(self) -> int:
        return len(self.row_lengths)

    @property
    def seq_len(self) -> int:
        return max(self.row_lengths, default=0)

    def _reserve(self, length: int, like: torch.Tensor) -> None:
        """Grow every block's buffer [max_rows, capacity, C] to hold `length` positions (doubling)."""
        if self.buffers[0] is not None and length <= self.buffers[0].shape[1]:
            return
        size = max(length, self.capacity or 0, 2 * self.buffers[0].shape[1] if self.buffers[0] is not None else 0)
        self.capacity, self._angles = size, None
        for b, buf in enumerate(self.buffers):
            grown = like.new_zeros(self.max_rows, size, like.shape[-1])
            if buf is not None:
                grown[:, : buf.shape[1]] = buf
            self.buffers[b] = grown

    def add(self, cache: LatentCache, source_row: int = 0, length: int | None = None) -> int:
        """Copy the first `length` positions (default all) of row `source_row` of a prefilled cache into a new last
        row; return the row. A cache of several right-padded prompts is copied one row at a time, each with its own
        length (the padding after a prompt is never copied)."""
        if self.rows >= self.max_rows:
            raise ValueError(f"the batch is full: {self.rows} rows (max_rows={self.max_rows})")
        length = cache.seq_len if length is None else length
        self._reserve(length + 1, cache.buffers[0])
        row = self.rows
        for buf, src in zip(self.buffers, cache.buffers):
            buf[row, :length] = src[source_row, :length]
        self.row_lengths.append(length)
        return row

    def remove(self, row: int) -> None:
        """Drop `row`; the last row takes its place (callers keeping a list per row swap the same way)."""
        last = self.rows - 1
        if row != last:
            n = self.row_lengths[last]
            for buf in self.buffers:
                buf[row, :n] = buf[last, :n]
            self.row_lengths[row] = n
        self.row_lengths.pop()

    def angles(self, config: ModelConfig, past: int, length: int, device: torch.device):
        """cos, sin [B, rope/2] at each row's next position (`past` is ignored: each row has its own). Shaped as a
        verification's S positions are, so `rotations` builds one matrix pair per row."""
        if length != 1:
            raise ValueError(
                f"a BatchLatentCache decodes one position per row, not {length}: prefill prompts into a LatentCache"
            )
        if not self.rows:
            raise ValueError("a BatchLatentCache with no rows has nothing to decode: add a prefilled cache first")
        self._reserve(self.seq_len + 1, self.buffers[0])
        if self._angles is None:
            self._angles = rope_angles(config, torch.arange(self.capacity, device=device))
        positions = torch.tensor(self.row_lengths, device=device)
        T = self.seq_len + 1
        padding = torch.arange(T, device=device)[None, :] > positions[:, None]
        self._step = (positions, padding[:, None, :])
        cos, sin = self._angles
        return cos[positions], sin[positions]

    def absorbs(self, block: int, length: int) -> bool:
        return True  # `angles` already refused anything but one position per row

    def attend(self, block: int, q_BHC: torch.Tensor, latent_B1C: torch.Tensor, kv_rank: int) -> torch.Tensor:
        """`LatentCache.attend` per row: store each row's new latent at its own position, attend over positions up to
        it (the padding after a shorter row's end gets probability 0)."""
        positions, padding = self._step
        B = q_BHC.shape[0]
        buf = self.buffers[block]
        buf[torch.arange(B, device=buf.device), positions] = latent_B1C[:, 0]
        cached = buf[:B, : padding.shape[-1]]  # [B, T, C]
        scores = torch.bmm(q_BHC, cached.transpose(1, 2)).masked_fill_(padding, float("-inf"))
        return torch.bmm(scores.softmax(dim=-1), cached[..., :kv_rank])

    def advance(self) -> None:
        """Commit the step: every row is one position longer."""
        self.row_lengths = [n + 1 for n in self.row_lengths]
        self._step = None
