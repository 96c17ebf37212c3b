"""A full training step of the small preset (the trainer's own step: sampling, forward with routing, aux losses,
backward, clipping, AdamW, controller), measured side by side with a matmul probe in one run.

Prints per thread count: tokens/s, model FLOP/s (`flops_per_token` at the measured FFN experts per token) and MFU
against the probe: fwd + bwd of one dense SwiGLU on the step's tokens with the model's dense-FFN shapes, the rate
this core reaches on the model's own best-case GEMMs. Steps and probes alternate, so both see the same machine load;
medians over the repeats. Also peak memory (process RSS; CUDA allocator peak on a GPU).
Goal: MFU >= 0.5 of the probe on one thread. The last line prints it.

Then, on one thread, a model-level training step (forward, LM loss, backward, AdamW) of ours against transformers'
`LongcatFlashForCausalLM` loaded from our `save_hf` export of the same weights, on the same batches with the same
AdamW settings (ours: the trainer's `growth.adamw`, fused; transformers': a plain `torch.optim.AdamW`, as a new user
would write it). Ours also runs compiled (`train.speed.compile_dense`) and under bf16 autocast, transformers' under
bf16 autocast too; every variant steps once per repeat, in turn. Prints CPU seconds per step, speed against
transformers' fp32 step, the largest loss difference from transformers' fp32 run, the first step's time (compile),
dynamo's graph breaks, and the goals: ours at least 2x transformers' in fp32 with losses equal to 1e-5, and how many
steps the compiled step needs to win back its compile time.

`--write-golden` instead writes tests/golden/tiny_20_steps.json, the 20-step loss curve of the tiny preset that
tests/train/test_train.py checks (`golden_run` below is the one definition of that run).

Run: `.venv/bin/python benchmarks/train_step.py [--threads 1 2] [--repeats 5] [--part all|mfu|transformers]`
     `.venv/bin/python benchmarks/train_step.py --write-golden`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longcat_lab.data import DataConfig
from longcat_lab.model import accounting, presets
from longcat_lab.train import Trainer, train, train_preset

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "tiny_20_steps.json"


def golden_run(out_dir: str | Path) -> dict:
    """The golden run: tiny preset, 20 steps, Shakespeare + reasoning only (the stdlib differs between Python
    versions), one thread, its own tokenizer cache, seed 1234. Returns per-step series and versions."""
    import tokenizers

    out_dir = Path(out_dir)
    cfg = dataclasses.replace(
        train_preset("tiny").with_steps(20),
        num_threads=1,
        peak_flops=1e10,
        eval_every=0,
        ckpt_every=0,
        rg_every=0,
        batch_size=4,
        data=DataConfig(
            domains=("shakespeare", "reasoning"),
            max_bytes_per_domain=150_000,
            tokenizer_sample_bytes=60_000,
            cache_dir=str(out_dir / "cache"),
        ),
    )
    cfg.stages = [
        dataclasses.replace(s, mixture={k: v for k, v in s.mixture.items() if k != "python"}) for s in cfg.stages
    ]
    result = train(presets.tiny(), cfg, out_dir / "run", progress=False)
    rows = result.rows("train")
    keys = ("loss", "lm_loss", "balance_loss", "grad_norm", "ffn_experts_per_token")
    return {
        "versions": {
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
        },
        "series": {k: [r[k] for r in rows] for k in keys}
        | {"val_loss": [result.val_loss[d] for d in sorted(result.val_loss)]},
    }


def write_golden() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        got = golden_run(tmp)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    print(f"wrote {GOLDEN}: final loss {got['series']['loss'][-1]:.6f}")


def probe(tokens: int, d: int, f: int) -> tuple[float, float]:
    """(seconds, FLOPs) of fwd + bwd of one dense SwiGLU on `tokens` rows: the model's dense-FFN GEMM shapes."""
    x = torch.randn(tokens, d, requires_grad=True)
    w_gate, w_up, w_down = (
        torch.randn(f, d, requires_grad=True),
        torch.randn(f, d, requires_grad=True),
        torch.randn(d, f, requires_grad=True),
    )
    start = time.perf_counter()
    (F.silu(x @ w_gate.t()) * (x @ w_up.t()) @ w_down.t()).sum().backward()
    return time.perf_counter() - start, 3 * 2 * tokens * 3 * d * f


def bench(threads: int, repeats: int, cache: str | None) -> float:
    torch.set_num_threads(threads)
    mc = presets.small()
    cfg = dataclasses.replace(train_preset("small"), rg_every=0, peak_flops=1.0, data=DataConfig(cache_dir=cache or ""))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(mc, cfg, tmp, progress=False)
        seq = cfg.stages[0].seq_len
        tokens = cfg.batch_size * cfg.grad_accum * seq
        trainer.step()  # warm-up
        probe(tokens, mc.hidden_size, mc.ffn_hidden_size)
        steps, probes, ffn = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = trainer.step()
            steps.append(time.perf_counter() - t0)
            ffn.append(result.ffn_experts_per_token)
            seconds, probe_flops = probe(tokens, mc.hidden_size, mc.ffn_hidden_size)
            probes.append(seconds)
    step_s, probe_rate = statistics.median(steps), probe_flops / statistics.median(probes)
    k = statistics.mean(ffn)
    model_flops = accounting.flops_per_token(mc, seq, k) * tokens / step_s
    mfu = model_flops / probe_rate
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux -> GB
    print(
        f"{threads:>7} | {tokens / step_s:>8.0f} | {model_flops / 1e9:>12.2f} | {probe_rate / 1e9:>12.2f} | "
        f"{mfu:>5.2f} | {k:>5.2f} | {peak_rss:>6.2f}"
    )
    return mfu


# Ours against transformers ------------------------------------------------------------------------------------
def hf_model(folder: Path) -> torch.nn.Module:
    """transformers' LongcatFlashForCausalLM from an export folder, in training mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder).train()


def plain_adamw(model: torch.nn.Module, cfg, lr: float) -> torch.optim.AdamW:
    """torch's default AdamW with the trainer's settings and decay rule (matrices decayed, vectors not)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def ours_loss(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(idx, targets=targets, validate=False).loss


def hf_loss(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(idx).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def model_step(model, optimizer, loss_fn, idx: torch.Tensor, targets: torch.Tensor, bf16: bool) -> float:
    """Forward, LM loss, backward, AdamW; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(model, idx, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have finished."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def matmul_seconds(step) -> tuple[float, float]:
    """(seconds in matrix products, seconds in all ops) of one call of `step`, by torch.profiler's self CPU time."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6, total / 1e6


def build_variants(cfg) -> dict:
    """name: (model, optimizer, loss function, bf16) for ours (eager, compiled, bf16) and transformers' (fp32,
    bf16), all holding the same seeded small-preset weights."""
    import copy

    from longcat_lab.export import save_hf
    from longcat_lab.testing import random_model
    from longcat_lab.train import growth, speed

    base = random_model(presets.small(), 0, train=True)
    lr = cfg.stages[0].lr
    variants = {}
    for name, bf16, compiled in (("ours", False, False), ("ours compiled", False, True), ("ours bf16", True, False)):
        model = copy.deepcopy(base)
        optimizer = growth.adamw(model, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if compiled:
            speed.compile_dense(model)
        variants[name] = (model, optimizer, ours_loss, bf16)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(base, Path(tmp) / "hf")
        for name, bf16 in (("transformers", False), ("transformers bf16", True)):
            model = hf_model(Path(tmp) / "hf")
            variants[name] = (model, plain_adamw(model, cfg, lr), hf_loss, bf16)
    return variants


def versus_transformers(repeats: int) -> float:
    """Print the table described in the module docstring; returns ours' fp32 speed over transformers'.

    Steps are timed in CPU seconds of this process and its finished children (`cpu_seconds`: one thread, inductor
    compiling in this process, its C++ compiler a child), so that other jobs on a shared machine, which stretch
    wall time, move the figures less; wall seconds are printed beside them. Inductor's caches go to a fresh folder,
    so the first compiled step pays what a machine's first compiled run pays (later runs reuse the cache)."""
    import os

    import torch._inductor.config
    from torch._dynamo.utils import counters

    from longcat_lab.testing import random_ids
    from longcat_lab.train import speed

    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    cache = tempfile.TemporaryDirectory()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    mc, cfg = presets.small(), train_preset("small")
    batch, seq = cfg.batch_size, cfg.stages[0].seq_len
    variants = build_variants(cfg)
    cpu, wall, losses, first = ({name: [] for name in variants} for _ in range(4))
    for r in range(repeats + 1):  # repeat 0 warms up (and compiles)
        ids = random_ids(mc, (batch, seq + 1), seed=r)
        for name, (model, optimizer, loss_fn, bf16) in variants.items():
            c0, w0 = cpu_seconds(), time.perf_counter()
            losses[name].append(model_step(model, optimizer, loss_fn, ids[:, :-1], ids[:, 1:], bf16))
            (cpu[name] if r else first[name]).append(cpu_seconds() - c0)
            wall[name].append(time.perf_counter() - w0)
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    idx, targets = ids[:, :-1], ids[:, 1:]
    matmul = {
        name: matmul_seconds(lambda v=variants[name]: model_step(v[0], v[1], v[2], idx, targets, False))
        for name in ("ours", "transformers")
    }
    whole = speed.graph_breaks(variants["ours"][0], idx, targets)
    step_s = {name: statistics.median(v) for name, v in cpu.items()}
    ref = step_s["transformers"]
    print(f"\nsmall preset model step (forward, LM loss, backward, AdamW), {batch} x {seq} tokens, 1 thread; CPU")
    print(f"seconds of this process, median of {repeats} interleaved repeats after one warm-up step")
    print("variant           | CPU s/step | wall s/step | tokens/CPU s | vs transformers | max |loss - theirs| | 1st")
    for name, s_ in step_s.items():
        diff = max(abs(a - b) for a, b in zip(losses[name], losses["transformers"]))
        print(
            f"{name:<17} | {s_:>10.3f} | {statistics.median(wall[name][1:]):>11.3f} | {batch * seq / s_:>12.0f} | "
            f"{ref / s_:>14.2f}x | {diff:>17.2e} | {first[name][0]:>5.1f}"
        )
    for name, (mm, total) in matmul.items():
        print(f"{name}: {mm / total:.0%} of the step's op time is matrix products ({', '.join(MATMUL_OPS)})")
    mm_ours = matmul["ours"][0] / matmul["ours"][1] * step_s["ours"]
    print(f"fp32 ceiling: ours' matrix products take {mm_ours:.3f} s/step, {ref / mm_ours:.2f}x transformers' step")
    print(f"ours compiled: {graphs} graphs, {breaks} graph breaks (attention blocks and dense FFNs compiled)")
    print(f"whole model under dynamo: {whole['graphs']} graphs, {whole['graph_breaks']} graph breaks:")
    for reason in whole["reasons"]:
        print(f"  {reason}")
    saved = step_s["ours"] - step_s["ours compiled"]
    compile_s = first["ours compiled"][0] - first["ours"][0]
    if saved > 0:
        print(
            f"compile costs {compile_s:.0f} CPU s and saves {saved:.3f} s/step: it pays off after "
            f"{compile_s / saved:.0f} steps (the small preset runs {cfg.total_steps})"
        )
    else:
        print(f"compile costs {compile_s:.0f} CPU s and saves nothing per step ({-saved:.3f} s/step slower)")
    ratio = ref / step_s["ours"]
    diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["transformers"]))
    met = ratio >= 2 and diff <= 1e-5
    print(
        f"goal ours >= 2x transformers in fp32, losses equal to 1e-5: {ratio:.2f}x, max loss difference {diff:.1e} "
        f"({'met' if met else 'not met'})"
    )
    cache.cleanup()
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", help="tokenizer/stream cache folder (default: the library's)")
    parser.add_argument("--write-golden", action="store_true", help="write tests/golden/tiny_20_steps.json")
    parser.add_argument(
        "--part", choices=("all", "mfu", "transformers"), default="all", help="which table(s) to measure"
    )
    args = parser.parse_args()
    if args.write_golden:
        write_golden()
        return
    if args.part == "transformers":
        versus_transformers(args.repeats)
        return
    print(f"small preset train step, torch {torch.__version__}, median of {args.repeats} interleaved repeats")
    print("threads | tokens/s | model GFLOP/s | probe GFLOP/s |   MFU | FFN/t | RSS GB")
    mfus = {t: bench(t, args.repeats, args.cache) for t in args.threads}
    if torch.cuda.is_available():
        print(f"CUDA peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    if 1 in mfus:
        print(f"goal MFU >= 0.5 of the probe on one thread: {mfus[1]:.2f} ({'met' if mfus[1] >= 0.5 else 'not met'})")
    sys.stdout.flush()
    if args.part == "all":
        versus_transformers(args.repeats)


if __name__ == "__main__":
    main()
