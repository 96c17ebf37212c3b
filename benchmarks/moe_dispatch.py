"""Forward + backward of one MoE block: our sort-based dispatch against a straightforward mask-per-expert loop.

Prints, per CPU-sized config and measured side by side in one run (the machines are shared and noisy):
tokens/s and expert MFU (useful expert FLOPs / a matmul probe measured in the same run) for both dispatchers, then
the block time when the FFN share of selections is 1.0, 0.5 and 0.25 (forced through the router bias).
Goals: ours >= the mask loop at every config; expert-block MFU >= 0.85 on one thread; time at FFN share
0.5 <= 0.6 x time at share 1.0. The last line prints those three figures.

Run: `.venv/bin/python benchmarks/moe_dispatch.py [--threads 1] [--repeats 7]`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from longcat_lab.model import ModelConfig, MoE

# (tokens, hidden, expert hidden, N FFN experts, Z zero experts, top-k)
CONFIGS = [
    (1024, 256, 128, 16, 8, 6),
    (2048, 512, 256, 16, 8, 6),
    (2048, 768, 384, 32, 16, 8),
]


def build(tokens: int, d: int, f: int, n: int, z: int, k: int, seed: int = 0) -> tuple[MoE, torch.Tensor]:
    config = ModelConfig(
        hidden_size=d,
        expert_ffn_hidden_size=f,
        n_routed_experts=n,
        zero_expert_num=z,
        moe_topk=k,
        ffn_hidden_size=4 * f,
        vocab_size=256,
    )
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    u = torch.randn(1, tokens, d)
    return moe, u


def mask_loop_forward(moe: MoE, u: torch.Tensor) -> torch.Tensor:
    """The baseline: for every expert, find its tokens with a mask (one host sync per expert), compute, add."""
    u_TD = u.reshape(-1, u.shape[-1])
    ids_TK, weights_TK, _, _ = moe.router(u_TD)
    out = torch.zeros_like(u_TD)
    n = moe.experts.n_ffn
    # Same weight access as ours (unbind once), so that the comparison isolates the dispatch.
    gate_up, down = moe.experts.gate_up_proj.unbind(0), moe.experts.down_proj.unbind(0)
    for e in range(moe.router.num_experts):
        token_idx, slot = torch.where(ids_TK == e)
        if token_idx.numel() == 0:
            continue
        x = u_TD[token_idx]
        if e < n:
            gate, up = (x @ gate_up[e].t()).chunk(2, dim=-1)
            x = (F.silu(gate) * up) @ down[e].t()
        out = out.index_add(0, token_idx, x * weights_TK[token_idx, slot, None])
    return out.view_as(u)


def ours_forward(moe: MoE, u: torch.Tensor) -> torch.Tensor:
    return moe(u)[0]


def time_fwd_bwd(fn, moe: MoE, u: torch.Tensor) -> float:
    x = u.clone().requires_grad_()
    start = time.perf_counter()
    out = fn(moe, x)
    out.sum().backward()
    elapsed = time.perf_counter() - start
    moe.zero_grad(set_to_none=True)
    return elapsed


def matmul_probe(d: int, f: int, rows: int) -> tuple[float, float]:
    """One fwd+bwd of a single SwiGLU expert on one contiguous slice of `rows` tokens (the average slice an expert
    gets in the block): the rate this core attains on exactly the experts' GEMM shapes, with none of the routing,
    sorting, gathering or scattering. MFU against it is the share of time the block spends in useful expert math.
    Returns (seconds, FLOPs)."""
    x = torch.randn(rows, d, requires_grad=True)
    w_gate_up = torch.randn(2 * f, d, requires_grad=True)
    w_down = torch.randn(d, f, requires_grad=True)
    start = time.perf_counter()
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    ((F.silu(gate) * up) @ w_down.t()).sum().backward()
    return time.perf_counter() - start, 3 * 2 * rows * 3 * d * f


def force_ffn_share(moe: MoE, share: float) -> None:
    """Bias exactly round(K * (1 - share)) zero experts into every token's top-K; the rest go to FFN experts."""
    k, n, z = moe.router.top_k, moe.experts.n_ffn, moe.router.num_experts - moe.experts.n_ffn
    n_zero = round(k * (1 - share))
    if n_zero > z:
        raise ValueError(f"share={share} needs {n_zero} zero experts per token but zero_expert_num={z}")
    bias = moe.router.e_score_correction_bias
    bias.zero_()
    bias[n:] = -10.0
    bias[n : n + n_zero] = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} interleaved repeats")
    header = (
        f"{'T':>5} {'D':>4} {'F':>4} {'N+Z':>6} {'K':>2} | {'ours tok/s':>10} {'mask tok/s':>10} "
        f"{'ours/mask':>9} | {'ours MFU':>8} {'mask MFU':>8}"
    )
    print(header)
    worst_speedup, best_mfu, share_ratio = float("inf"), 0.0, None
    for tokens, d, f, n, z, k in CONFIGS:
        moe, u = build(tokens, d, f, n, z, k)
        with torch.no_grad():
            ffn_pairs = int((moe(u)[1].topk_ids < n).sum())
        rows = max(1, ffn_pairs // n)
        times = {"ours": [], "mask": [], "probe": []}
        for fn in (ours_forward, mask_loop_forward):  # warm-up
            time_fwd_bwd(fn, moe, u)
        matmul_probe(d, f, rows)
        for _ in range(args.repeats):  # interleaved, so that all three see the same machine load
            times["ours"].append(time_fwd_bwd(ours_forward, moe, u))
            times["mask"].append(time_fwd_bwd(mask_loop_forward, moe, u))
            seconds, probe_flops = matmul_probe(d, f, rows)
            times["probe"].append(seconds)
        useful = 3 * 2 * ffn_pairs * 3 * d * f  # fwd + bwd, 3 GEMMs per expert, 2 FLOPs per MAC
        med = {key: statistics.median(v) for key, v in times.items()}
        probe = probe_flops / med.pop("probe")
        mfu = {key: useful / med[key] / probe for key in med}
        speedup = med["mask"] / med["ours"]
        worst_speedup, best_mfu = min(worst_speedup, speedup), max(best_mfu, mfu["ours"])
        print(
            f"{tokens:>5} {d:>4} {f:>4} {n:>3}+{z:<2} {k:>2} | {tokens / med['ours']:>10.0f} "
            f"{tokens / med['mask']:>10.0f} {speedup:>9.2f} | {mfu['ours']:>8.2f} {mfu['mask']:>8.2f}"
        )
    # Compute that scales with the FFN share: the last (largest) config, forced shares, interleaved.
    tokens, d, f, n, z, k = CONFIGS[-1]
    moe, u = build(tokens, d, f, n, z, k)
    shares = (1.0, 0.5, 0.25)
    share_times = {s: [] for s in shares}
    for _ in range(args.repeats):
        for s in shares:
            force_ffn_share(moe, s)
            share_times[s].append(time_fwd_bwd(ours_forward, moe, u))
    med = {s: statistics.median(v) for s, v in share_times.items()}
    print(
        "block time by FFN share of selections: "
        + ", ".join(f"{s:.2f}: {med[s] * 1e3:.1f} ms ({med[s] / med[1.0]:.2f}x)" for s in shares)
    )
    share_ratio = med[0.5] / med[1.0]
    print(
        f"RESULT worst ours/mask speedup {worst_speedup:.2f} (goal >= 1.0); best expert MFU {best_mfu:.2f} "
        f"(goal >= 0.85); time at share 0.5 / share 1.0 = {share_ratio:.2f} (goal <= 0.6)"
    )


if __name__ == "__main__":
    main()
