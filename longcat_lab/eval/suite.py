"""The evaluator: every metric of this package on one model, as a JSON-ready dict and a printed table.

- `evaluate_model(model, dataset, seq_len, level)`: level "full" (bits per byte with compressors, arithmetic, code,
  in-context copying, routing) or "cheap" (bits per byte and FFN experts per token only: the trainer's
  per-evaluation subset, one extra forward over the validation windows, no generation).
- `evaluate_checkpoint(path)`: load a checkpoint (or a run folder's newest), rebuild its data, run "full", and
  write `eval.json` inside the checkpoint folder (atomically); what `longcat-lab eval --ckpt RUN` runs.
- `format_table(result)`: the human-readable table.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from pathlib import Path

import torch

from longcat_lab import checkpoint
from longcat_lab._util import atomic_write_bytes, check_choice, json_bytes
from longcat_lab.data import load_dataset
from longcat_lab.eval.bpb import bits_per_byte
from longcat_lab.eval.copying import copy_score, format_copying
from longcat_lab.eval.routing import routing_summary
from longcat_lab.eval.tasks import arithmetic, code
from longcat_lab.model.accounting import activated_params
from longcat_lab.train.config import TrainConfig

LEVELS = ("cheap", "full")
EVAL_FILE = "eval.json"
FULL_WINDOWS = 64


def evaluate_model(
    model,
    dataset,
    seq_len: int,
    level: str = "full",
    windows: int = 16,
    arithmetic_n: int = 32,
    code_n: int = 24,
    batch_size: int = 8,
) -> dict:
    """The metrics of `level` (module docstring) for `model` on `dataset`'s held-out split."""
    check_choice("level", level, LEVELS)
    full = level == "full"
    # The full level reads more text: compressors need a few kilobytes before their headers stop dominating.
    windows = max(windows, FULL_WINDOWS) if full else windows
    t0 = time.perf_counter()
    out: dict = {
        "level": level,
        "bits_per_byte": {
            d: r.to_dict() for d, r in bits_per_byte(model, dataset, seq_len, windows, batch_size, full).items()
        },
    }
    routing = routing_summary(model, dataset, seq_len, max(1, windows // 2), batch_size)
    if full:
        out["routing"] = routing
        if "reasoning" in dataset.val:
            out["arithmetic"] = arithmetic(model, dataset, arithmetic_n).to_dict()
        if "python" in dataset.val:
            out["code"] = code(model, dataset, code_n)
        out["copying"] = copy_score(model)
    else:
        out["ffn_experts_per_token"] = routing.get("ffn_experts_per_token")
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate_checkpoint(path, level: str = "full", arithmetic_n: int = 32, code_n: int = 24, write: bool = True):
    """(result, path of eval.json or None): the evaluator on a checkpoint, written next to its files. Runs on one
    torch thread (restored afterwards)."""
    ckpt = checkpoint.resolve(path)
    with one_thread():
        return _evaluate_checkpoint(ckpt, level, arithmetic_n, code_n, write)


@contextlib.contextmanager
def one_thread():
    # Generation of a lab-sized model is one small op after another: a second thread only waits for a core, and on
    # a busy machine that wait dominates decoding.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _evaluate_checkpoint(ckpt, level, arithmetic_n, code_n, write):
    model, _, meta = checkpoint.load(ckpt)
    tc = TrainConfig.from_dict(json.loads((ckpt / "train_config.json").read_text()))
    dataset = load_dataset(model.config.vocab_size, tc.data)
    seq_len = tc.eval_seq_len or tc.stages[0].seq_len
    result = evaluate_model(model, dataset, seq_len, level, tc.eval_windows, arithmetic_n, code_n, tc.batch_size)
    result.update(
        {
            "checkpoint": str(ckpt),
            "step": meta.get("step"),
            "activated_params": _activated(model.config),
            "machine": platform.platform(),
        }
    )
    out = None
    if write:
        out = Path(ckpt) / EVAL_FILE
        atomic_write_bytes(out, json_bytes(result))
    return result, out


def _activated(config) -> float:
    return activated_params(config)["mean"]


def _f(v, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(result: dict) -> str:
    """The evaluator's table: bits per byte per domain with its reference points, then the task metrics."""
    lines = ["bits per byte on held-out text (lower is better; same bytes for every column):"]
    lines.append(f"  {'domain':12s} {'model':>7s} {'unigram':>8s} {'gzip':>7s} {'lzma':>7s} {'bytes':>8s}")
    for d, r in result["bits_per_byte"].items():
        lines.append(
            f"  {d:12s} {_f(r['model']):>7s} {_f(r['unigram']):>8s} {_f(r['gzip']):>7s} {_f(r['lzma']):>7s} "
            f"{r['bytes']:>8d}"
        )
    a = result.get("arithmetic")
    if a:
        steps = ", ".join(f"{k} steps {v['exact']}/{v['total']}" for k, v in a["by_steps"].items())
        lines.append(f"arithmetic exact match (greedy, every step checked): {a['exact']}/{a['problems']} ({steps})")
    c = result.get("code")
    if c:
        lines.append(
            f"code on {c['functions']} held-out functions: sampled bodies that parse {_f(c['parse_rate'], '.0%')}, "
            f"next line exact {_f(c['next_line_exact'], '.0%')} (baseline 'repeat the line above' "
            f"{_f(c['repeat_line_baseline'], '.0%')})"
        )
    if result.get("copying"):
        lines.append(format_copying(result["copying"]))
    r = result.get("routing")
    if r:
        per_layer = ", ".join(
            f"L{la['layer']} {la['ffn_experts_per_token']:.2f} (imbalance {la['load_imbalance']:.2f})"
            for la in r["layers"]
        )
        lines.append(f"FFN experts per token (uniform routing {r['uniform']:.2f}): {per_layer}")
        lines.append("  by token class: " + ", ".join(f"{k} {v:.2f}" for k, v in r["by_class"].items()))
    elif result.get("ffn_experts_per_token") is not None:
        lines.append(f"FFN experts per token: {result['ffn_experts_per_token']:.2f}")
    return "\n".join(lines)


__all__ = ["EVAL_FILE", "LEVELS", "evaluate_checkpoint", "evaluate_model", "format_table", "one_thread"]
