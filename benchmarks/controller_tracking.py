"""How fast and how cleanly each expert-bias controller holds the compute budget (docs/design.md §2.1, D4).

Two plants, every controller on the same data from the same start:
1. the synthetic routing problem (`longcat_lab.testing.SyntheticRouting`: fixed, skewed router logits, no training,
   no noise): a step response from the skewed start (~3.4 FFN experts per token) to the uniform share 4.0;
2. a short training run of the tiny preset (AdamW on a seeded Markov-chain token stream) with the target set to 1.0
   FFN experts per token against the uniform 1.33 at init, so the controller must pull the budget down while the
   router itself keeps learning (a drifting, noisy plant).
For each mode and a few gains it prints steps to settle within 2% of the target (for good: a settle step is the
first step after which the trace never leaves the band, and it must hold for at least the last quarter of the run;
on the training run the trace is a 10-step moving average, because one batch's mean is noisy), the overshoot past
the target (fraction of the target), the steady-state error (mean over the last quarter), the late per-step RMS error
(unsmoothed, so oscillations show) and the final max/min FFN-expert load. It then measures the balance loss's
gradient ratio R_g on the training run for two values of alpha (the evidence for LossConfig's default), and prints
the goal line: the default PID's settle step against the paper's rule at the default mu.

Run: .venv/bin/python benchmarks/controller_tracking.py            (2-3 minutes on a shared 2-core CPU)
     .venv/bin/python benchmarks/controller_tracking.py --quick    (a few seconds; fewer steps and gains)
"""

from __future__ import annotations

import argparse
import time

import torch

from longcat_lab.model import presets
from longcat_lab.testing import SyntheticRouting, random_model
from longcat_lab.train.control import BiasController, ControllerConfig
from longcat_lab.train.losses import LossConfig, aux_losses
from longcat_lab.train.metrics import balance_grad_ratio, tracking_summary


def grid(quick: bool) -> list[tuple[str, dict]]:
    """(mode, overrides) rows for the synthetic plant: the defaults of each mode first, then other gains."""
    rows = [("none", {}), ("paper", {}), ("sign", {}), ("pid", {})]
    if quick:
        return rows
    return rows + [
        ("paper", {"bias_update_rate": 0.3}),
        ("paper", {"bias_update_rate": 1.0}),
        ("sign", {"bias_update_rate": 0.3}),
        ("pid", {"pid_gains": (0.0, 0.1, 0.0)}),  # the paper's budget dynamics at mu = 0.1, for reference
        ("pid", {"pid_gains": (0.0, 0.3, 0.0)}),
        ("pid", {"pid_gains": (0.0, 1.0, 0.0)}),
        ("pid", {"pid_gains": (0.25, 0.5, 0.0)}),
        ("pid", {"pid_gains": (1.0, 0.5, 0.0)}),
        ("pid", {"pid_gains": (0.0, 0.5, 0.2)}),
    ]


# Training steps cost ~100x a synthetic step, so the training plant gets a subset of the grid.
TRAIN_ROWS = [
    ("none", {}),
    ("paper", {}),
    ("paper", {"bias_update_rate": 0.3}),
    ("sign", {}),
    ("pid", {}),
    ("pid", {"pid_gains": (0.25, 0.5, 0.0)}),
    ("pid", {"pid_gains": (0.0, 0.5, 0.2)}),
]
RG_ALPHAS = (1e-2, 1e-3)


def markov_stream(vocab_size: int, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """Token batches [batch, seq+1] from a seeded sparse Markov chain (each token has 4 possible successors), so the
    model has structure to learn and the router has something to specialise on."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab_size, (vocab_size, 4), generator=g)
    batches = []
    for _ in range(steps):
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab_size, (batch,), generator=g)
        pick = torch.randint(0, 4, (batch, seq), generator=g)
        for t in range(seq):
            x[:, t + 1] = successors[x[:, t], pick[:, t]]
        batches.append(x)
    return batches


def train_trace(
    config: ControllerConfig,
    batches: list[torch.Tensor],
    device: torch.device,
    seed: int,
    loss_config: LossConfig | None = None,
    rg_every: int = 0,
) -> tuple[list[float], dict, float, list[tuple[int, float, float]]]:
    """Train the tiny preset from a fixed init with this controller (and the aux losses when `loss_config` is
    given); per-step FFN experts per token, the last controller report, the last LM loss, and every `rg_every`
    steps (step, tangent R_g, raw R_g) of the balance loss."""
    model = random_model(presets.tiny(), seed, device=device, train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    controller = BiasController(config, model)
    trace, ratios = [], []
    for step, x in enumerate(batches):
        x = x.to(device)
        out = model(x[:, :-1], targets=x[:, 1:], return_routing=True)
        loss, routing = out.loss, out.routing
        total = loss
        if loss_config is not None:
            aux = aux_losses(routing, loss_config, model.config, controller.target)
            if rg_every and (step % rg_every == 0 or step == len(batches) - 1):
                ratios.append(
                    (
                        step,
                        balance_grad_ratio(loss, aux["balance_loss"], routing),
                        balance_grad_ratio(loss, aux["balance_loss"], routing, tangent=False),
                    )
                )
            total = loss + sum(aux.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        report = controller.step()
        trace.append(report["ffn_experts_per_token_mean"])
    return trace, report, loss.item(), ratios


def label(mode: str, overrides: dict) -> str:
    cfg = ControllerConfig(bias_controller=mode, **overrides)
    if mode == "pid":
        kp, ki, kd = cfg.pid_gains
        return f"pid kp={kp:g} ki={ki:g} kd={kd:g} mu={cfg.bias_update_rate:g}"
    if mode in ("paper", "sign"):
        return f"{mode} mu={cfg.bias_update_rate:g}"
    return mode


def fmt_row(name: str, s: dict, imbalance: list, extra: str = "") -> str:
    settle = "never" if s["settle_step"] is None else str(s["settle_step"])
    worst = max((x if x is not None else float("inf")) for x in imbalance)
    return (
        f"{name:38s} {settle:>7s} {100 * s['overshoot']:9.2f}% {100 * s['steady_state_error']:9.2f}% "
        f"{100 * s['late_rms_error']:9.2f}% {worst:9.2f}{extra}"
    )


HEADER = f"{'controller':38s} {'settle':>7s} {'overshoot':>10s} {'ss error':>10s} {'late rms':>10s} {'max/min':>9s}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and only the default gains")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="synthetic steps per run (default 150, quick 40); the training run takes 4/5 of it",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is fastest for these small ops on a shared 2-core machine",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 150)
    train_steps = max(1, steps * 4 // 5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = grid(args.quick)
    settle: dict[tuple[str, str], tuple] = {}
    start = time.perf_counter()

    plant = SyntheticRouting(tokens=2048, seed=args.seed)
    target = plant.model.config.uniform_ffn_experts
    print(
        f"Synthetic routing problem: N={plant.model.config.n_routed_experts} FFN + "
        f"Z={plant.model.config.zero_expert_num} zero experts, top-{plant.model.config.moe_topk}, "
        f"{len(plant.inputs)} layers, 2048 tokens/step, target {target:g} FFN experts/token, {steps} steps"
    )
    print(HEADER)
    for mode, overrides in rows:
        cfg = ControllerConfig(bias_controller=mode, target_ffn_experts=target, **overrides)
        reports = plant.run(cfg, steps)
        s = tracking_summary([r["ffn_experts_per_token_mean"] for r in reports], target)
        settle[("synthetic", label(mode, overrides))] = (s["settle_step"], s["overshoot"])
        print(fmt_row(label(mode, overrides), s, reports[-1]["load_imbalance"]))

    train_target = 1.0
    batches = markov_stream(presets.tiny().vocab_size, train_steps, batch=8, seq=64, seed=args.seed)
    print(
        f"\nTraining run, tiny preset (AdamW lr 3e-3, 8x64 tokens/step, {train_steps} steps, device {device}), "
        f"target {train_target:g} FFN experts/token (uniform share at init {presets.tiny().uniform_ffn_experts:.3f});"
        f" settle/overshoot/ss error on a 10-step moving average"
    )
    print(HEADER + f" {'LM loss':>8s}")
    for mode, overrides in rows if args.quick else TRAIN_ROWS:
        cfg = ControllerConfig(bias_controller=mode, target_ffn_experts=train_target, **overrides)
        trace, report, loss, _ = train_trace(cfg, batches, device, args.seed)
        s = tracking_summary(trace, train_target, window=10)
        settle[("train", label(mode, overrides))] = (s["settle_step"], s["overshoot"])
        print(fmt_row(label(mode, overrides), s, report["load_imbalance"], f" {loss:8.3f}"))

    if not args.quick:
        print(
            "\nBalance-loss gradient ratio R_g (docs/design.md §2.3, keep < 0.1) on the same training run, "
            "default controller and aux losses, per alpha: tangent R_g (raw R_g) at steps ..."
        )
        for alpha in RG_ALPHAS:
            cfg = ControllerConfig(target_ffn_experts=train_target)
            *_, ratios = train_trace(cfg, batches, device, args.seed, LossConfig(balance_loss_coef=alpha), rg_every=20)
            cells = ", ".join(f"{step}: {tan:.3f} ({raw:.3f})" for step, tan, raw in ratios)
            print(f"  alpha={alpha:g}: {cells}")

    print(
        "\nGoal: the default PID settles at least twice as fast as the paper's rule at the default mu, "
        "with no more overshoot."
    )
    paper, pid = label("paper", {}), label("pid", {})
    for plant_name in ("synthetic", "train"):
        (s_paper, o_paper), (s_pid, o_pid) = settle[(plant_name, paper)], settle[(plant_name, pid)]
        n = steps if plant_name == "synthetic" else train_steps
        if s_pid is None:
            verdict = f"the default PID did not settle (paper: {s_paper or 'never'})"
        elif s_paper is None:
            # The paper's rule did not settle by the last quarter of the run: its settle step is later than 3n/4.
            verdict = (
                f"paper did not settle within the run, pid at step {s_pid}: ratio > {0.75 * n / s_pid:.2f}x, "
                f"overshoot paper {100 * o_paper:.2f}% vs pid {100 * o_pid:.2f}% -> "
                f"{'met' if 0.75 * n / s_pid >= 2 and o_pid <= o_paper else 'NOT met'}"
            )
        else:
            ok = s_paper / s_pid >= 2 and o_pid <= o_paper
            verdict = (
                f"paper/pid settle ratio {s_paper / s_pid:.2f}x, overshoot paper {100 * o_paper:.2f}% "
                f"vs pid {100 * o_pid:.2f}% -> {'met' if ok else 'NOT met'}"
            )
        print(f"  {plant_name:9s}: {verdict}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
