"""The grouped expert kernel of the MoE (docs/design.md §1.4): `ExpertDispatch`, gather -> per-expert SwiGLU ->
routing weight -> scatter-add as one autograd node with a hand-written backward, and the per-thread CPU scratch
buffers its temporaries live in. `longcat_lab.model.moe.Experts` sorts the (token, expert) pairs and calls it.

Shape legend: T tokens, P (token, expert) pairs sorted by expert, D model dim, F expert hidden, N FFN experts.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F


class _Scratch(threading.local):
    """Reusable CPU buffers for the dispatch's large temporaries, one set per thread.

    On CPU a fresh multi-megabyte tensor is returned to the OS when freed, so every step pays page faults to get it
    back, which costs more than the fill itself (benchmarks/RESULTS.md "moe_dispatch").
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
    def compute(
        x_TD: torch.Tensor,
        token_idx_P: torch.Tensor,
        weights_P: torch.Tensor,
        gate_up_t: torch.Tensor,
        down_t: torch.Tensor,
        sizes: list[int],
        save: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The forward arithmetic: (out_TD, with `save` what backward needs in the compute dtype, else ()). The
        expert weights come transposed, gate_up_t [N, D, 2F] and down_t [N, F, D]: views of the parameters when
        training, contiguous copies from a `LatentCache` when decoding. `Experts` calls this directly when no
        gradient is wanted, which skips the autograd.Function machinery."""
        device = x_TD.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
        with torch.autocast(device_type=device, enabled=False):
            x_PD = to_dtype(x_TD, dtype).index_select(0, token_idx_P)  # each pair's input, sorted by expert
            w_P1 = to_dtype(weights_P, dtype)[:, None]
            w_gu_t, w_d_t = to_dtype(gate_up_t, dtype), to_dtype(down_t, dtype)
            f = w_d_t.shape[1]
            # Every expert's weights and rows by unbind and split, one call per tensor, not one slice per expert: at
            # decoding sizes the loop's op calls, not its arithmetic, are what costs.
            gate_up_e, down_e = w_gu_t.unbind(0), w_d_t.unbind(0)
            used, rows = used_experts(sizes)
            h_P2F = x_PD.new_empty(x_PD.shape[0], 2 * f)  # [gate | up] pre-activations
            for e, x_e, h_e in zip(used, x_PD.split(rows), h_P2F.split(rows)):
                torch.mm(x_e, gate_up_e[e], out=h_e)
            gate, up = h_P2F[:, :f], h_P2F[:, f:]
            silu_PF = F.silu(gate)
            scaled_PF = silu_PF * w_P1  # the routing weight, folded in at width F
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
    def forward(
        ctx,
        x_TD: torch.Tensor,
        token_idx_P: torch.Tensor,
        weights_P: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        sizes: list[int],
    ) -> torch.Tensor:
        out_TD, saved = ExpertDispatch.compute(
            x_TD, token_idx_P, weights_P, gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2), sizes, save=True
        )
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
        grad_y_PD = torch.index_select(
            grad_out_TD.to(x_PD.dtype), 0, token_idx_P, out=_scratch.get("grad_y", x_PD.shape, x_PD)
        )
        # empty, not zeros: every used expert's rows are overwritten below, so zero-filling the whole stacked
        # gradient would be wasted work; only unused experts get explicit zeros.
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
        torch.mul(grad_act_PF, scaled_PF, out=grad_up)  # d/d up
        grad_scaled_PF = grad_act_PF.mul_(up)  # d/d (w * silu(gate)), in place
        grad_w_P = torch.mul(grad_scaled_PF, silu_PF, out=grad_gate).sum(-1)  # d/d w (grad_gate as scratch)
        torch.ops.aten.silu_backward.grad_input(grad_scaled_PF.mul_(w_P1), gate, grad_input=grad_gate)
        grad_x_PD = grad_y_PD  # its rows are dead once read: reuse them
        for e, grad_h_e, x_e, grad_x_e in zip(used, grad_h_P2F.split(rows), x_PD.split(rows), grad_x_PD.split(rows)):
            torch.mm(grad_h_e.t(), x_e, out=grad_gu_e[e])
            torch.mm(grad_h_e, w_gu_e[e], out=grad_x_e)
        grad_x_TD = grad_x_PD.new_zeros(ctx.n_tokens, x_PD.shape[1]).index_add_(0, token_idx_P, grad_x_PD)
        return (
            grad_x_TD.to(x_dtype),
            None,
            grad_w_P.to(w_dtype),
            grad_gu.to(param_dtype),
            grad_d.to(param_dtype),
            None,
        )


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipping the call when it would be a no-op (decoding counts op calls)."""
    return t if t.dtype == dtype else t.to(dtype)


def used_experts(sizes: list[int]) -> tuple[list[int], list[int]]:
    """(the experts with at least one row, their row counts) from every expert's row count."""
    used = [e for e, size in enumerate(sizes) if size]
    return used, [sizes[e] for e in used]
