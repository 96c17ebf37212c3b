"""The README's figures, rendered by this library and saved as small PNGs with plotly's static export (kaleido,
which drives the system Chromium): `longcat-lab figures` writes them to docs/figures/. Each is a real measurement of
a tiny model trained here for a few hundred steps, so they change (a little) when the model or training changes.
`longcat-lab figures --sweeps results` draws one figure per committed sweep summary instead (`sweep_figures`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from longcat_lab import checkpoint
from longcat_lab._util import atomic_write_bytes, check_int
from longcat_lab.data import validation_texts
from longcat_lab.model import presets
from longcat_lab.perf.overlap import measure_overlap
from longcat_lab.perf.trace import load_trace
from longcat_lab.train import read_metrics, train, train_preset
from longcat_lab.viz.activation import route_text, token_compute_map
from longcat_lab.viz.eval import sweep_panel
from longcat_lab.viz.perf import timeline_figure
from longcat_lab.viz.routing import controller_traces, expert_load, expert_load_heatmap

# Notebook-like width, and a scale that keeps each PNG near 100 kB while staying sharp on a high-DPI screen.
WIDTH, SCALE = 760, 1.5
NAMES = ("expert_load", "token_compute", "controller", "overlap_timeline")


def _browser() -> None:
    """Point kaleido at the system Chromium (it would otherwise look for, or download, a Chrome of its own)."""
    if os.environ.get("BROWSER_PATH"):
        return
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            os.environ["BROWSER_PATH"] = found
            return
    raise RuntimeError("no Chromium found for plotly's static export: install chromium or set BROWSER_PATH")


def readme_figures(steps: int = 300, seed: int = 0) -> dict:
    """name -> plotly figure: the expert-load heatmap and a per-token compute map of held-out prose routed by a
    tiny model trained for `steps` steps, that run's controller trace, and one overlapped expert-parallel step of
    two gloo ranks as a timeline."""
    check_int("steps", steps)
    with tempfile.TemporaryDirectory(prefix="longcat-figures-") as tmp:
        # Throughput alerts off: on a shared machine they report the neighbours' load, not the run's.
        cfg = dataclasses.replace(train_preset("tiny", seed=seed).with_steps(steps), alert_throughput_drop=0.01)
        train(presets.tiny(), cfg, Path(tmp) / "run", progress=False)
        model, tokenizer, _ = checkpoint.load(Path(tmp) / "run")
        model.eval()
        rows = read_metrics(Path(tmp) / "run")
        texts = validation_texts(cfg.data)
        routed = [route_text(model, tokenizer, doc, max_tokens=192) for docs in texts.values() for doc in docs[:4]]
        prose_tokens, prose_routing = route_text(model, tokenizer, texts["shakespeare"][0][:400], max_tokens=96)
        overlap = measure_overlap(presets.tiny(), seed=seed, batch=2, seq_len=32, reps=2, trace_dir=Path(tmp) / "tr")
        traces = [load_trace(p) for p in overlap["traces"]]
    return {
        "expert_load": expert_load_heatmap(expert_load([r for _, r in routed], model.config)),
        "token_compute": token_compute_map(
            prose_tokens, prose_routing, title="Shakespeare, held out: FFN experts per token (all layers)"
        ),
        "controller": controller_traces(rows),
        "overlap_timeline": timeline_figure(traces, "overlapped", title="overlapped (ScMoE) step, two gloo ranks"),
    }


def save_png(fig, path: Path, width: int = WIDTH, scale: float = SCALE) -> Path:
    """Render `fig` with kaleido into `path` (atomically); the height is the figure's own."""
    import plotly.io as pio

    _browser()
    atomic_write_bytes(Path(path), pio.to_image(fig, format="png", width=width, scale=scale))
    return Path(path)


def render(out: str | os.PathLike = "docs/figures", steps: int = 300, seed: int = 0) -> list[Path]:
    """Write the README's figures as `out/<name>.png`; returns the paths."""
    _browser()  # fail before training, not after
    figures = readme_figures(steps, seed)
    return [save_png(figures[name], Path(out) / f"{name}.png") for name in NAMES]


def sweep_figures(results: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """`out/sweep_NAME.png` (`viz.eval.sweep_panel`) for every sweep summary `results/NAME.json`; returns the
    paths."""
    paths = sorted(p for p in Path(results).glob("*.json") if "sweep" in json.loads(p.read_text()))
    if not paths:
        raise ValueError(f"results={str(results)!r} holds no sweep summary (NAME.json with a 'sweep' key)")
    _browser()
    return [save_png(sweep_panel(json.loads(p.read_text())), Path(out) / f"sweep_{p.stem}.png") for p in paths]
