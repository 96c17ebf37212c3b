"""The expert-bias controller that holds the compute budget (paper 2.1.1-2.1.2, Eq. 2; docs/design.md §2.1, D4).

The router picks experts by top-K of p + b; b (`router.e_score_correction_bias`, over N FFN and Z zero experts) moves
*which* experts are chosen, never their weights. Moving every FFN-expert bias up against the zero experts raises the
number of FFN experts a token uses (its compute); moving one FFN expert against the others shifts load between them.
`BiasController` reads the selections each MoE block counted during the training forwards of one optimizer step
(`router.expert_counts`, all micro-batches together), updates b once, and clears the counts. Modes:

- "paper": Eq. 2 literally, Delta b_i = mu * (K_e/(K N) - T_i/(K T_all)) for FFN experts, zero-expert bias fixed.
  Summed over FFN experts this moves the FFN-vs-zero offset by mu * e/(K N), e = K_e - (measured FFN experts per
  token): the budget is held by a pure integral controller (docs/design.md §11.1).
- "pid": a real PID on the budget error e, acting on the FFN-vs-zero offset, u = (kp e + ki sum e + kd Delta e)/(K N)
  with anti-windup (integral clamp) and an output clamp; the FFN experts are balanced among themselves by Eq. 2 with
  its mean removed. The 1/(K N) puts the gains in mu's units: pid_gains (0, mu, 0) gives the paper's budget dynamics.
- "sign": DeepSeek-V3's aux-loss-free rule, Delta b_i = mu/(K N) * sign(K_e/(K N) - T_i/(K T_all)): a fixed step the
  size of the paper's step for a one-expert-per-token error, toward the same non-uniform target.
- "none": b stays put; counts are still read, reported and cleared.

After every update the FFN-expert biases are mean-centred by subtracting their mean from *all* N + Z biases. Top-K of
p + b does not change when every bias moves by the same constant, so this changes no routing decision; it stops the
biases drifting (a pitfall of uncentred aux-free balancing) while the budget signal survives as the FFN-vs-zero
offset, which is then simply minus the (shared) zero-expert bias.

Shape legend: L MoE layers, E = N + Z experts, N FFN experts, K top-k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from longcat_lab._util import check_int, check_nonnegative, check_positive_float, from_known_fields, is_number
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM

CONTROLLER_MODES = ("paper", "pid", "sign", "none")


@dataclass
class ControllerConfig:
    """How the expert bias is steered (training config; the trainer wires these fields to the CLI)."""

    # "paper" is Eq. 2 as printed (docs/design.md D4); "pid", "sign" and "none" are the variants we compare. "pid" is
    # the default because it held the compute budget better over 20 seeds per mode at no loss we could see (§2.1).
    bias_controller: str = "pid"
    # K_e, FFN experts per token; None = the uniform share K*N/(N+Z), which is 8 for the release, i.e. the paper's
    # ~27B average activated parameters (docs/design.md §1.4). The paper never prints K_e.
    target_ffn_experts: float | None = None
    # mu of Eq. 2 (unpublished). At 0.1 the per-expert balancing stays stable on a fresh tiny model, where 0.3
    # already let one FFN expert run far hotter than another (benchmarks/controller_tracking.py, RESULTS.md).
    bias_update_rate: float = 0.1
    # mu is multiplied by this every optimizer step; the paper says a decay helps but gives no schedule, so it is off.
    bias_update_decay: float = 1.0
    # (kp, ki, kd) in mu's units (module docstring). ki = 5 mu runs the budget loop faster than the per-expert
    # balancing, which mu = 0.1 keeps stable; kp and kd are 0 because, with one step of delay and the high plant gain
    # of a fresh router, they only added oscillation in benchmarks/controller_tracking.py (README results).
    pid_gains: tuple[float, float, float] = (0.0, 0.5, 0.0)
    # Anti-windup: the integral term's share of the offset, in bias units. Probabilities lie in [0, 1], so an offset
    # of 1 already makes every FFN expert beat every zero expert; integrating further only stores overshoot.
    integral_clamp: float = 1.0
    # Same physical bound for the whole PID output (offset between FFN and zero experts, bias units).
    output_clamp: float = 1.0

    def __post_init__(self) -> None:
        if self.bias_controller not in CONTROLLER_MODES:
            raise ValueError(
                f"bias_controller={self.bias_controller!r} is not allowed: it must be one of {CONTROLLER_MODES}"
            )
        if self.target_ffn_experts is not None:
            check_nonnegative("target_ffn_experts", self.target_ffn_experts)
        check_nonnegative("bias_update_rate", self.bias_update_rate)
        d = self.bias_update_decay
        if not is_number(d) or not (0 < d <= 1):
            raise ValueError(f"bias_update_decay={d!r} is not allowed: it must be a number in (0, 1] (1 = no decay)")
        gains = self.pid_gains
        if not isinstance(gains, (tuple, list)) or len(gains) != 3:
            raise ValueError(f"pid_gains={gains!r} is not allowed: it must be three numbers (kp, ki, kd)")
        for name, g in zip(("kp", "ki", "kd"), gains):
            if not is_number(g) or g < 0:
                raise ValueError(f"pid_gains={gains!r} is not allowed: {name}={g!r} must be a finite number >= 0")
        self.pid_gains = tuple(float(g) for g in gains)
        for name in ("integral_clamp", "output_clamp"):
            check_positive_float(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pid_gains"] = list(self.pid_gains)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControllerConfig:
        """Build from a dict, refusing unknown keys (`_util.from_known_fields`)."""
        return from_known_fields(cls, data)


def resolve_target(config: ControllerConfig, model_config: ModelConfig) -> float:
    """K_e for this model: the configured target, or the uniform share K*N/(N+Z); ValueError if out of [0, K]."""
    K = model_config.moe_topk
    target = model_config.uniform_ffn_experts if config.target_ffn_experts is None else float(config.target_ffn_experts)
    if not (0 <= target <= K):
        raise ValueError(f"target_ffn_experts={target!r} is not allowed: it must lie in [0, moe_topk={K}]")
    if model_config.zero_expert_num == 0 and target != K:
        raise ValueError(
            f"target_ffn_experts={target!r} is not allowed for a model without zero experts: every "
            f"token then uses moe_topk={K} FFN experts, so the target must be {K} (or None)"
        )
    return target


class BiasController:
    """Steers every MoE block's expert bias once per optimizer step (paper Eq. 2, or the PID / sign variants).

    Call `step()` exactly once per optimizer step, after all micro-batches' forwards. State (`state_dict`): the bias
    of every layer, the PID integral term and previous error, and the step count."""

    def __init__(self, config: ControllerConfig, model: LongCatLM):
        if not isinstance(config, ControllerConfig):
            raise ValueError(f"config must be a ControllerConfig, got {type(config).__name__}")
        self.config = config
        self.model = model
        mc = model.config
        self.target = resolve_target(config, mc)
        self.n_ffn, self.top_k = mc.n_routed_experts, mc.moe_topk
        self.blocks = model.moe_blocks()
        L = len(self.blocks)
        device = model.device
        self.integral_L = torch.zeros(L, dtype=torch.float64, device=device)
        self.prev_error_L = torch.zeros(L, dtype=torch.float64, device=device)
        self.step_count = 0
        if config.bias_controller == "pid" and L and mc.zero_expert_num:
            # Bumpless start: a model whose bias already holds an offset (a checkpoint, another mode) keeps routing
            # as before, because the integral term starts at that offset.
            self.integral_L = self._offset_L().clamp(-config.integral_clamp, config.integral_clamp)

    # Helpers ---------------------------------------------------------------------------------------------------
    def _bias_LE(self) -> torch.Tensor:
        return torch.stack([b.router.e_score_correction_bias for b in self.blocks]).to(torch.float64)

    def _offset_L(self) -> torch.Tensor:
        """Mean FFN-expert bias minus mean zero-expert bias: what sets the budget."""
        bias_LE = self._bias_LE()
        N = self.n_ffn
        return bias_LE[:, :N].mean(1) - bias_LE[:, N:].mean(1)

    def update_rate(self) -> float:
        """mu at the current step (after decay)."""
        return self.config.bias_update_rate * self.config.bias_update_decay**self.step_count

    # The update ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """Read and clear the counts of this optimizer step, update the biases, and report (JSON-serialisable)."""
        cfg, N, K = self.config, self.n_ffn, self.top_k
        mu = self.update_rate()
        self.step_count += 1
        report: dict[str, Any] = {
            "step": self.step_count,
            "mode": cfg.bias_controller,
            "update_rate": mu,
            "target_ffn_experts": self.target,
        }
        if not self.blocks:
            return report
        counts_LE = torch.stack([b.router.expert_counts for b in self.blocks]).to(torch.float64)
        tokens_L = counts_LE.sum(1) / K
        if bool((tokens_L == 0).any()):
            raise RuntimeError(
                "BiasController.step(): a MoE block counted no tokens since the last step; the "
                "counts come from training-mode forwards only (call model.train()), and step() must "
                "run once per optimizer step, after the forwards"
            )
        share_LE = counts_LE / (K * tokens_L[:, None])  # share of all K*T routing slots
        ffn_L = counts_LE[:, :N].sum(1) / tokens_L  # measured FFN experts per token
        error_L = self.target - ffn_L
        bias_LE = self._bias_LE()
        target_share = self.target / (K * N)
        mode = cfg.bias_controller
        if mode == "paper":
            bias_LE[:, :N] += mu * (target_share - share_LE[:, :N])
        elif mode == "sign":
            bias_LE[:, :N] += mu / (K * N) * torch.sign(target_share - share_LE[:, :N])
        elif mode == "pid":
            # Balance FFN experts among themselves (Eq. 2 minus its mean: no net budget effect) ...
            ffn_share_LN = share_LE[:, :N]
            bias_LE[:, :N] += mu * (ffn_share_LN.mean(1, keepdim=True) - ffn_share_LN)
            # ... and hold the budget with the PID on the FFN-vs-zero offset.
            kp, ki, kd = cfg.pid_gains
            scale = 1.0 / (K * N)
            self.integral_L = (self.integral_L + ki * scale * error_L).clamp(-cfg.integral_clamp, cfg.integral_clamp)
            # No derivative kick on the first step: there is no previous error yet.
            derivative_L = error_L - self.prev_error_L if self.step_count > 1 else torch.zeros_like(error_L)
            offset_L = (kp * scale * error_L + self.integral_L + kd * scale * derivative_L).clamp(
                -cfg.output_clamp, cfg.output_clamp
            )
            bias_LE[:, :N] -= bias_LE[:, :N].mean(1, keepdim=True)
            bias_LE[:, N:] = (-offset_L)[:, None]
        self.prev_error_L = error_L
        bias_LE -= bias_LE[:, :N].mean(1, keepdim=True)  # mean-centre FFN biases; top-K unchanged
        for block, bias_E in zip(self.blocks, bias_LE):
            block.router.e_score_correction_bias.copy_(bias_E)
            block.router.expert_counts.zero_()

        ffn_counts_LN = counts_LE[:, :N]
        max_L, min_L = ffn_counts_LN.max(1).values, ffn_counts_LN.min(1).values
        spread_L = bias_LE[:, :N].max(1).values - bias_LE[:, :N].min(1).values
        offset_L = (
            bias_LE[:, :N].mean(1) - bias_LE[:, N:].mean(1) if bias_LE.shape[1] > N else torch.zeros_like(spread_L)
        )
        report.update(
            ffn_experts_per_token=ffn_L.tolist(),
            ffn_experts_per_token_mean=ffn_L.mean().item(),
            controller_error=error_L.mean().item(),
            controller_error_per_layer=error_L.tolist(),
            bias_spread=spread_L.max().item(),
            bias_spread_per_layer=spread_L.tolist(),
            ffn_zero_offset=offset_L.tolist(),
            # max/min FFN-expert load; None where an FFN expert got no token at all (the ratio is infinite).
            load_imbalance=[(mx / mn) if mn > 0 else None for mx, mn in zip(max_L.tolist(), min_L.tolist())],
            tokens=tokens_L.tolist(),
        )
        return report

    # Checkpointing ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: bias [L, E], PID integral and previous error [L], step."""
        bias = (
            torch.stack([b.router.e_score_correction_bias for b in self.blocks]).clone()
            if self.blocks
            else torch.zeros(0, self.model.config.num_experts)
        )
        return {
            "bias": bias,
            "integral": self.integral_L.clone(),
            "prev_error": self.prev_error_L.clone(),
            "step": self.step_count,
            "mode": self.config.bias_controller,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted({"bias", "integral", "prev_error", "step"} - set(state))
        if missing:
            raise ValueError(f"controller state is missing {missing}; expected keys bias, integral, prev_error, step")
        L, E = len(self.blocks), self.model.config.num_experts
        bias = torch.as_tensor(state["bias"])
        if tuple(bias.shape) != (L, E):
            raise ValueError(f"controller state bias has shape {tuple(bias.shape)}: this model needs ({L}, {E})")
        for name in ("integral", "prev_error"):
            shape = tuple(torch.as_tensor(state[name]).shape)
            if shape != (L,):
                raise ValueError(f"controller state {name} has shape {shape}: this model needs ({L},)")
        step = state["step"]
        check_int("controller state step", step, 0)
        for block, bias_E in zip(self.blocks, bias):
            block.router.e_score_correction_bias.copy_(bias_E)
        device = self.integral_L.device
        self.integral_L = torch.as_tensor(state["integral"], dtype=torch.float64).to(device).clone()
        self.prev_error_L = torch.as_tensor(state["prev_error"], dtype=torch.float64).to(device).clone()
        self.step_count = step


__all__ = ["CONTROLLER_MODES", "ControllerConfig", "BiasController", "resolve_target"]
