"""A serving cost model for LongCat-style decoding with wide expert parallelism (paper 5.3, Table 7; docs/design.md §7.1
and §5): per-layer stage times, the time per output token (TPOT) under three schedules, and the cost per million
output tokens.

Stages of one layer in one decode step, per device (docs/design.md §7.1, SBO):
    attn0     MLA_0, which everything after it needs
    dense0    FFN_0, the dense work the ScMoE order can run while dispatch is in flight
    dispatch  all-to-all of the tokens' hidden states to the ranks owning their FFN experts
    moe       the expert GEMMs of the rows this device received
    combine   all-to-all of the expert outputs back
    dense1    MLA_1 + FFN_1, the dense work that can run while combine is in flight
(The paper's SBO also moves MLA_1's QKV projection under dispatch; we keep all of MLA_1 in dense1.)

Per-layer time t for each schedule, with C = attn0 + dense0 + moe + dense1 and M = dispatch + combine:
    sequential  t = C + M                                              nothing overlaps (vanilla MoE order)
    sbo         t = attn0 + max(dispatch, dense0) + moe + max(combine, dense1)    ScMoE single-batch overlap
    tbo         t = 2 * max(C_half, M_half)                            two-batch overlap: two micro-batches of
                half the batch alternate, one computing while the other communicates; C_half, M_half are the
                stage sums at half the batch (= C/2, M/2 when only full-batch times are known, i.e. times linear
                in the batch, which flatters TBO when decoding is weight-bandwidth bound)
Then, with L layers, m MTP draft tokens accepted with probability a each (sequentially):
    TPOT = L * t / (1 + a + a^2 + ... + a^m)                            (the MTP head's own time is neglected)
    cost per 1M output tokens = price_per_gpu_hour / 3600 * TPOT / batch_per_device * 1e6
since a device emits batch_per_device tokens every TPOT seconds.

Stage times come either from the paper (`PAPER_TABLE7`, SBO stage times for LongCat-Flash) or from a roofline
estimate (`layer_times`): each compute stage takes max(FLOPs / peak FLOP/s, bytes / memory bandwidth), each
exchange takes bytes / network bandwidth + a fixed latency. The hardware defaults are our reading of an H800 SXM
datasheet, not figures from the paper.

The figures that draw these numbers (`gantt_figure`, `tpot_figure`) live in `longcat_lab.viz.perf`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longcat_lab._util import check_int, check_nonnegative, check_positive_float, is_number
from longcat_lab.model import accounting
from longcat_lab.model.config import ModelConfig

SCHEDULES = ("sequential", "tbo", "sbo")
SCHEDULE_NAMES = {
    "sequential": "sequential (vanilla MoE)",
    "tbo": "two-batch overlap (TBO)",
    "sbo": "ScMoE single-batch overlap (SBO)",
}


@dataclass
class Hardware:
    """Per-GPU figures (ours, read from public datasheets; the paper gives only the price)."""

    name: str = "H800 SXM"
    # Dense BF16 tensor-core peak; the H800 SXM has the H100 SXM's compute.
    flops: float = 989e12
    # HBM3 bandwidth in bytes/s.
    mem_bw: float = 3.35e12
    # Inter-node RDMA bandwidth per GPU in bytes/s: one 400 Gb/s NIC per GPU.
    net_bw: float = 50e9
    # Fixed cost of one all-to-all (launch and synchronisation), in seconds; a guess of the order DeepEP reports.
    net_latency: float = 20e-6
    # $ per GPU-hour: the paper's assumption for its cost figures (docs/design.md §7.1).
    price_per_hour: float = 2.0

    def __post_init__(self) -> None:
        for name in ("flops", "mem_bw", "net_bw", "price_per_hour"):
            check_positive_float(name, getattr(self, name))
        check_nonnegative("net_latency", self.net_latency)


@dataclass
class Serving:
    """How the model is served; defaults are the paper's Table 7 setting for LongCat-Flash."""

    # Sequences decoded at once per device (Table 7).
    batch_per_device: int = 96
    # Devices the FFN experts are spread over (Table 7).
    expert_parallel: int = 128
    # Average context length, for the KV-cache reads of attention (Table 6 measures at 5000).
    context_len: int = 5000
    # MTP draft tokens verified per step, and the chance each is accepted (Table 7: 1 token, 80%).
    mtp_tokens: int = 1
    mtp_acceptance: float = 0.8
    # FFN experts per token; None = uniform routing K*N/(N+Z), 8 for the release (the paper's ~27B average).
    ffn_experts_per_token: float | None = None
    # Bytes per weight, per KV-cache value, per dispatched and per combined activation value. FP8 dispatch and
    # BF16 combine is DeepEP's usual choice and would explain combine = 2 x dispatch in Table 7 [inferred].
    weight_bytes: float = 2.0
    kv_bytes: float = 2.0
    dispatch_bytes: float = 1.0
    combine_bytes: float = 2.0

    def __post_init__(self) -> None:
        for name in ("batch_per_device", "expert_parallel", "context_len"):
            check_int(name, getattr(self, name))
        check_int("mtp_tokens", self.mtp_tokens, 0)
        if not (isinstance(self.mtp_acceptance, (int, float)) and 0 <= self.mtp_acceptance <= 1):
            raise ValueError(f"mtp_acceptance={self.mtp_acceptance!r} is not allowed: it must be in [0, 1]")
        for name in ("weight_bytes", "kv_bytes", "dispatch_bytes", "combine_bytes"):
            check_positive_float(name, getattr(self, name))
        if self.ffn_experts_per_token is not None:
            check_positive_float("ffn_experts_per_token", self.ffn_experts_per_token)

    @property
    def tokens_per_step(self) -> int:
        """Tokens each device pushes through a layer per decode step: every sequence's token plus its drafts."""
        return self.batch_per_device * (1 + self.mtp_tokens)

    @property
    def expected_tokens_per_step(self) -> float:
        """Output tokens per sequence per step: 1 + a + ... + a^m (draft i counts only if drafts 1..i pass)."""
        return 1 + sum(self.mtp_acceptance**i for i in range(1, self.mtp_tokens + 1))


@dataclass
class LayerTimes:
    """Seconds per stage of one layer in one decode step (see the module docstring)."""

    attn0: float
    dense0: float
    dispatch: float
    moe: float
    combine: float
    dense1: float

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not is_number(v) or v < 0:
                raise ValueError(f"{f.name}={v!r} is not allowed: a stage time must be a finite number >= 0 (s)")

    @property
    def compute(self) -> float:
        return self.attn0 + self.dense0 + self.moe + self.dense1

    @property
    def comm(self) -> float:
        return self.dispatch + self.combine

    def scaled(self, factor: float) -> LayerTimes:
        return LayerTimes(**{f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self)})


# The paper's Table 7 row for LongCat-Flash (docs/design.md §7.1): per-layer SBO stage times in microseconds, 28 layers,
# MTP 1 token at 80% acceptance, batch 96 per device, EP 128, and its results: TPOT 16 ms, $0.09 per 1M tokens.
PAPER_TABLE7 = {
    "attention_us": 264,
    "dispatch_us": 236,
    "moe_us": 60,
    "combine_us": 472,
    "num_layers": 28,
    "mtp_tokens": 1,
    "mtp_acceptance": 0.8,
    "batch_per_device": 96,
    "expert_parallel": 128,
    "price_per_hour": 2.0,
    "tpot_ms": 16,
    "cost_per_million": 0.09,
}


def paper_table7_times() -> LayerTimes:
    """Table 7's stage times as `LayerTimes`. They are SBO's four stages, so the dense work hidden under dispatch
    and combine is inside them and unpublished: dense0 = dense1 = 0 here. Any dense0 <= dispatch and
    dense1 <= combine gives the same SBO time; sequential and TBO times from these inputs are not the paper's."""
    p = PAPER_TABLE7
    return LayerTimes(
        attn0=p["attention_us"] * 1e-6,
        dense0=0.0,
        dispatch=p["dispatch_us"] * 1e-6,
        moe=p["moe_us"] * 1e-6,
        combine=p["combine_us"] * 1e-6,
        dense1=0.0,
    )


def _roofline(flops: float, bytes_: float, hw: Hardware) -> float:
    return max(flops / hw.flops, bytes_ / hw.mem_bw)


def layer_times(config: ModelConfig, hw: Hardware | None = None, serving: Serving | None = None) -> LayerTimes:
    """Roofline estimate of the stage times of one layer on one device (our model, not the paper's figures).

    Attention is data-parallel (each device decodes its own sequences) and reads the MLA latent cache, with the
    up-projections absorbed; experts are spread evenly over `expert_parallel` devices and routing is balanced, so
    each device receives as many rows as it sends. Router, norms and the MTP head are neglected."""
    hw, sv = hw or Hardware(), serving or Serving()
    c = config
    N, D = c.n_routed_experts, c.hidden_size
    if N % sv.expert_parallel:
        raise ValueError(
            f"expert_parallel={sv.expert_parallel} is not allowed for n_routed_experts={N}: "
            "it must divide the number of FFN experts"
        )
    k = c.uniform_ffn_experts if sv.ffn_experts_per_token is None else sv.ffn_experts_per_token
    if k > c.max_ffn_experts:
        raise ValueError(
            f"ffn_experts_per_token={k} is not allowed: it must be at most "
            f"min(moe_topk, n_routed_experts) = {c.max_ffn_experts}"
        )
    n = sv.tokens_per_step
    H, latent = c.num_attention_heads, c.kv_latent_dim
    mla = accounting.mla_params(c)
    # Absorbed MLA decode: scores over the latent + RoPE key, values from the latent, per head per cached token.
    core_flops = n * H * sv.context_len * 2 * (latent + c.kv_lora_rank)
    attn = _roofline(
        2 * mla * n + core_flops,
        mla * sv.weight_bytes + sv.batch_per_device * sv.context_len * latent * sv.kv_bytes,
        hw,
    )
    ffn_params = 3 * D * c.ffn_hidden_size
    ffn = _roofline(2 * ffn_params * n, ffn_params * sv.weight_bytes, hw)
    expert_params = 3 * D * c.expert_ffn_hidden_size
    rows = n * k  # rows each device receives (balanced routing)
    moe = _roofline(2 * expert_params * rows, N // sv.expert_parallel * expert_params * sv.weight_bytes, hw)
    remote = rows * D * (sv.expert_parallel - 1) / sv.expert_parallel  # values that leave the device
    return LayerTimes(
        attn0=attn,
        dense0=ffn,
        dispatch=remote * sv.dispatch_bytes / hw.net_bw + hw.net_latency,
        moe=moe,
        combine=remote * sv.combine_bytes / hw.net_bw + hw.net_latency,
        dense1=attn + ffn,
    )


def layer_time(times: LayerTimes, schedule: str, half_batch: LayerTimes | None = None) -> float:
    """Seconds per layer under `schedule` (module docstring). `half_batch` feeds TBO; default times / 2."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not allowed: it must be one of {SCHEDULES}")
    if schedule == "sequential":
        return times.compute + times.comm
    if schedule == "sbo":
        return times.attn0 + max(times.dispatch, times.dense0) + times.moe + max(times.combine, times.dense1)
    half = half_batch or times.scaled(0.5)
    return 2 * max(half.compute, half.comm)


def tpot(
    times: LayerTimes,
    num_layers: int,
    schedule: str,
    mtp_tokens: int = 1,
    mtp_acceptance: float = 0.8,
    half_batch: LayerTimes | None = None,
) -> float:
    """Seconds per output token: num_layers * layer_time / (1 + a + ... + a^m)."""
    check_int("num_layers", num_layers)
    per_step = Serving(mtp_tokens=mtp_tokens, mtp_acceptance=mtp_acceptance).expected_tokens_per_step
    return num_layers * layer_time(times, schedule, half_batch) / per_step


def cost_per_million(tpot_s: float, batch_per_device: int, price_per_hour: float) -> float:
    """$ per 1M output tokens for a device that emits batch_per_device tokens every tpot_s seconds."""
    check_positive_float("tpot_s", tpot_s)
    check_int("batch_per_device", batch_per_device)
    check_positive_float("price_per_hour", price_per_hour)
    return price_per_hour / 3600 * tpot_s / batch_per_device * 1e6


def estimate(config: ModelConfig, hw: Hardware | None = None, serving: Serving | None = None) -> dict:
    """Stage times (full and half batch) and, per schedule, TPOT (s), tokens/s per user and per GPU, and $/1M."""
    hw, sv = hw or Hardware(), serving or Serving()
    times = layer_times(config, hw, sv)
    half = None
    if sv.batch_per_device >= 2:
        half = layer_times(config, hw, dataclasses.replace(sv, batch_per_device=sv.batch_per_device // 2))
    out = {"times": times, "half_batch_times": half, "schedules": {}}
    for schedule in SCHEDULES:
        t = tpot(times, config.num_layers, schedule, sv.mtp_tokens, sv.mtp_acceptance, half)
        out["schedules"][schedule] = {
            "tpot_s": t,
            "tokens_per_s_per_user": 1 / t,
            "tokens_per_s_per_gpu": sv.batch_per_device / t,
            "cost_per_million": cost_per_million(t, sv.batch_per_device, hw.price_per_hour),
        }
    return out


# Schedules in time -----------------------------------------------------------------------------------------------
def layer_gantt(times: LayerTimes, schedule: str) -> list[tuple[str, str, float, float]]:
    """(lane, stage, start s, end s) of one layer for "sequential" or "sbo": when each stage runs on the compute
    and the network lane. The last end equals `layer_time(times, schedule)`."""
    if schedule not in ("sequential", "sbo"):
        raise ValueError(f"schedule={schedule!r} is not allowed: the Gantt view draws 'sequential' or 'sbo'")
    t = times
    if schedule == "sequential":
        spans, clock = [], 0.0
        for lane, stage, d in (
            ("compute", "attn0", t.attn0),
            ("compute", "dense0", t.dense0),
            ("network", "dispatch", t.dispatch),
            ("compute", "moe", t.moe),
            ("network", "combine", t.combine),
            ("compute", "dense1", t.dense1),
        ):
            spans.append((lane, stage, clock, clock + d))
            clock += d
        return spans
    s2 = t.attn0
    s3 = s2 + max(t.dispatch, t.dense0)
    s4 = s3 + t.moe
    return [
        ("compute", "attn0", 0.0, s2),
        ("network", "dispatch", s2, s2 + t.dispatch),
        ("compute", "dense0", s2, s2 + t.dense0),
        ("compute", "moe", s3, s4),
        ("network", "combine", s4, s4 + t.combine),
        ("compute", "dense1", s4, s4 + t.dense1),
    ]


__all__ = [
    "Hardware",
    "Serving",
    "LayerTimes",
    "PAPER_TABLE7",
    "paper_table7_times",
    "layer_times",
    "layer_time",
    "tpot",
    "cost_per_million",
    "estimate",
    "layer_gantt",
    "SCHEDULES",
    "SCHEDULE_NAMES",
]
