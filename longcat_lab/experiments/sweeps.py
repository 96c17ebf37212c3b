"""The named sweeps: the paper's small-scale ablations (docs/design.md §3.6) as variants of `--set` overrides.

A `Sweep` names its variants (the first is the baseline every other is compared with), the metrics its verdicts
use, the paper's claim, and why a lab-scale run may not reproduce it. Variants must spend the same compute
(activated parameters, FLOPs per token, tokens seen) unless listed in `compute_varies`: the variants whose compute
*is* the variable (a budget sweep, growth's cheaper first half).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sweep:
    name: str
    variants: dict[str, tuple[str, ...]]  # variant -> `--set FIELD=VALUE` overrides; the first is the baseline
    metrics: tuple[str, ...]  # keys of `summary.run_metrics`, compared per seed against the baseline
    claim: str  # what the paper reports (docs/design.md section)
    lab_caveat: str  # why lab scale may differ
    compute_varies: tuple[str, ...] = ()  # variants exempt from the matched-compute check
    grow_from_half: tuple[str, ...] = field(default=())  # variants started from a half-depth run (growth init)

    @property
    def baseline(self) -> str:
        return next(iter(self.variants))


_LOSS = ("val_loss", "bits_per_byte")
SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in (
        Sweep(
            "layer",
            {"scmoe": ("layer_style=scmoe",), "vanilla": ("layer_style=vanilla",), "dense": ("layer_style=dense",)},
            _LOSS,
            "Fig. 4: the shortcut-connected layer costs no quality against a vanilla MoE layer at equal compute.",
            "Minutes of CPU training on three small corpora; the paper compares 2.4B-16B models over billions of "
            "tokens. The dense variant matches activated compute, not total parameters.",
        ),
        Sweep(
            "zero_experts",
            {
                "fixed_topk": ("zero_expert_num=0", "moe_topk=2"),
                "zero_experts": ("target_ffn_experts=2",),
                "zero_experts_ke1.5": ("target_ffn_experts=1.5",),
                "zero_experts_ke2.5": ("target_ffn_experts=2.5",),
            },
            (*_LOSS, "ffn_experts_per_token"),
            "Fig. 3a (and MoE++ Table 3): zero-computation experts beat a fixed top-k baseline at the same mean FFN "
            "compute; more budget buys lower loss.",
            "The controller needs steps to settle, a large share of a 300-step run; the gain in the paper comes "
            "from allocating compute per token, which a tiny model may not exploit.",
            compute_varies=("zero_experts_ke1.5", "zero_experts_ke2.5"),
        ),
        Sweep(
            "controller",
            {
                "paper": ("bias_controller=paper",),
                "pid": ("bias_controller=pid",),
                "sign": ("bias_controller=sign",),
                "none": ("bias_controller=none",),
            },
            ("budget_error", "settle_step", "load_imbalance", *_LOSS),
            "§3 / D4: the paper's update (Eq. 2) holds the FFN-expert budget; the design compares PID and "
            "DeepSeek's sign rule against it and against no control.",
            "A fresh router's plant gain is high and noisy at 16 x 64 tokens per step; the paper's runs are "
            "millions of tokens per step.",
        ),
        Sweep(
            "z_loss",
            {"off": ("hidden_z_loss_coef=0",), "on": ("hidden_z_loss_coef=1e-5",)},
            ("max_hidden", *_LOSS),
            "Fig. 6: the hidden z-loss keeps the last layers' hidden-state magnitudes down without hurting loss.",
            "Massive activations grow with scale and BF16 training; a fp32 CPU model of this size may never "
            "develop them. 1e-5 (above the default 1e-7) so the term is not negligible at this size.",
        ),
        Sweep(
            "adam_eps",
            {"eps_1e-16": ("adam_eps=1e-16",), "eps_1e-8": ("adam_eps=1e-8",)},
            (*_LOSS, "grad_rms"),
            "Fig. 7: loss degrades once Adam's eps approaches the gradient RMS, which shrinks as models grow; "
            "1e-16 sits safely below it.",
            "Our gradient RMS (reported) is orders above 1e-8, so both eps should agree here: the paper's effect "
            "needs much larger models.",
        ),
        Sweep(
            "growth",
            {"scratch": (), "growth": ()},
            _LOSS,
            "Fig. 5b: a model grown by stacking a half-depth model trained on the first part of the data ends "
            "below one trained from scratch on the same tokens.",
            "The paper grows a 6B-activated model after tens of billions of tokens; here 2 layers from 1 after half "
            "of a 300-step run. Growth spends less compute in its first half (stated in the compute table).",
            compute_varies=("growth",),
            grow_from_half=("growth",),
        ),
        Sweep(
            "mla_scale",
            {"scale_on": ("mla_scale=true",), "scale_off": ("mla_scale=false",)},
            _LOSS,
            "Fig. 5a: the MLA scale correction (alpha_q, alpha_kv) improves loss.",
            "The correction matters when the low-rank latents are much narrower than the model (d/d_kv = 12 in the "
            "release); mini has d/d_kv = 4, so the effect should be smaller.",
        ),
    )
}

# Direction of each metric for the verdict rule (all of ours are lower-is-better; kept explicit per metric).
METRIC_DIRECTION = {
    "val_loss": "lower",
    "bits_per_byte": "lower",
    "ffn_experts_per_token": "lower",
    "budget_error": "lower",
    "settle_step": "lower",
    "load_imbalance": "lower",
    "max_hidden": "lower",
    "grad_rms": "lower",
}


def get(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ValueError(f"sweep={name!r} is not allowed: it must be one of {sorted(SWEEPS)}")
    return SWEEPS[name]


__all__ = ["METRIC_DIRECTION", "SWEEPS", "Sweep", "get"]
