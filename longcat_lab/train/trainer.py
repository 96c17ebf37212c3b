"""The trainer: multi-stage AdamW training on the built-in data, with the budget controller, auxiliary losses,
telemetry, checkpoints that resume bit for bit, skipped non-finite steps and a deterministic re-run (SDC) check.

- `train(model_config, train_config, out_dir, resume=False, progress=True, callback=None) -> TrainResult`: the
  entry point; `callback(row)` receives every metrics row as it is written (live plots: `viz.training.LivePlot`).
- `Trainer`: one run (on several ranks, each rank's part of it: `train.distributed`, docs/design.md §14). Its
  constructor builds everything (data, model, optimizer, controller, sampler, telemetry)
  and, with `resume=True`, restores the newest checkpoint; `step()` takes one optimizer step (its forward and
  backward and the SDC re-run are `train.step`'s) and returns a `StepResult`, which `Telemetry.row` turns into the
  metrics row; `run()` loops, evaluates and saves (checkpoint contents: `train.resume`).
- `TrainResult` (run_dir, model, tokenizer, dataset, step, val_loss, checkpoint, counters; `.rows(kind)`),
  `TrainingError`.

Resume: `resume=True` continues from the newest checkpoint of `out_dir` that verifies (a fresh start when there
is none; newer, damaged ones are moved aside with a warning) and logs exactly the losses of an uninterrupted run;
it refuses a configuration that differs from the checkpoint's, except for fields that only change logging and
saving (`train.resume.RESUME_FREE_FIELDS`). A finished run trains nothing. A run holds the folder's writer lock
(`train.lock`) from construction to the end of `run()` (or `close()`).

Token ids are checked once, when the token streams are loaded, so the model runs every training micro-batch with
`validate=False` (no host sync for id checks). Paper references: AdamW eps, hidden z-loss and the balance loss,
multi-stage data, determinism and SDC checks (docs/design.md §3-4); growth init and width transfer in `growth`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longcat_lab._util import check_seed
from longcat_lab.data import Dataset, MixtureSampler, load_dataset
from longcat_lab.eval.bpb import bits_per_byte
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM
from longcat_lab.train import checkpoint, growth, metrics, speed
from longcat_lab.train.config import TrainConfig, every, lr_at, stage_at
from longcat_lab.train.control import BiasController
from longcat_lab.train.evaluation import evaluate
from longcat_lab.train.lock import RunLock, RunLockedError
from longcat_lab.train.resume import config_diffs, init_from, restore, save_checkpoint
from longcat_lab.train.step import StepResult, forward_backward, sdc_check, step_loss_keys
from longcat_lab.train.telemetry import ProgressBar, Telemetry, read_metrics

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (too many non-finite steps, an incompatible resume); the message says why."""


@dataclass
class TrainResult:
    run_dir: Path
    model: LongCatLM
    tokenizer: Any
    dataset: Dataset
    step: int  # optimizer steps done (= total_steps unless stopped early)
    val_loss: dict[str, float]  # the last evaluation, per domain
    checkpoint: Path  # the checkpoint written at `step`
    skipped_steps: int
    alert_counts: dict[str, int]
    sdc_mismatches: int
    resumed_from: int | None  # the step a resume continued from

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path, kind)


def resolve_device(name: str) -> torch.device:
    """The torch device of `TrainConfig.device`; a ValueError naming the field when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not allowed: it must be 'auto', 'cpu', 'mps' or 'cuda[:N]'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(
                f"device={name!r} is not allowed: this machine has {count} CUDA device(s); use device=cpu or auto"
            )
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={name!r} is not allowed: MPS is not available here; use device=cpu or auto")
    return device


# More threads than this only oversubscribes the cores, and very large counts crash the OpenMP runtime.
MAX_THREADS_PER_CPU = 4


def check_runtime(cfg: TrainConfig) -> torch.device:
    """The checks of a TrainConfig that depend on this machine (device, thread count) or on the generators' range
    (seed); the CLI runs them before any work. Returns the device."""
    check_seed("seed", cfg.seed)
    limit = MAX_THREADS_PER_CPU * (os.cpu_count() or 1)
    if cfg.num_threads > limit:
        raise ValueError(
            f"num_threads={cfg.num_threads} is not allowed: it must be from 0 (torch's default) to {limit} "
            f"({MAX_THREADS_PER_CPU} per logical CPU of this machine)"
        )
    return resolve_device(cfg.device)


def _check_positions(mc: ModelConfig, cfg: TrainConfig) -> int:
    """Every stage's and the evaluation's sequence length fit the model; returns the evaluation's."""
    for s in cfg.stages:
        if s.seq_len > mc.max_position_embeddings:
            raise ValueError(
                f"stage {s.name!r}: seq_len={s.seq_len} is not allowed: it must be <= "
                f"max_position_embeddings={mc.max_position_embeddings}"
            )
    eval_seq_len = cfg.eval_seq_len or cfg.stages[0].seq_len
    if eval_seq_len > mc.max_position_embeddings:
        raise ValueError(
            f"eval_seq_len={eval_seq_len} is not allowed: it must be <= "
            f"max_position_embeddings={mc.max_position_embeddings}"
        )
    return eval_seq_len


def _check_token_streams(dataset: Dataset, vocab_size: int) -> None:
    """Every token id of every stream lies in the model's vocabulary: checked once here, so that the training
    forwards can skip the model's per-batch id check."""
    if dataset.tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tokenizer's {dataset.tokenizer.get_vocab_size()} tokens"
        )
    for split, streams in (("train", dataset.train), ("val", dataset.val)):
        for domain, ids in streams.items():
            lo, hi = (int(v) for v in torch.aminmax(ids.long())) if ids.numel() else (0, 0)
            if lo < 0 or hi >= vocab_size:
                raise ValueError(
                    f"the {split} stream of {domain!r} holds token ids from {lo} to {hi}; allowed "
                    f"ids are 0..{vocab_size - 1} (vocab_size={vocab_size})"
                )


class Trainer:
    """One run: owns the model, optimizer, controller, sampler, telemetry and the run folder. `train()` is the
    entry point; the constructor builds (and with `resume`, restores) everything, `step()` takes one step."""

    def __init__(
        self,
        model_config: ModelConfig,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        resume: bool = False,
        progress: bool = True,
        callback: Callable[[dict[str, Any]], Any] | None = None,
        parallel: Any = None,
    ):
        self.mc, self.cfg, self.run_dir = model_config, cfg, Path(out_dir)
        # Several ranks (train.distributed.DataExpertParallel): rank 0 holds the lock, logs and draws the bar.
        self.parallel = parallel
        self.main = parallel is None or parallel.ctx.is_main
        self.progress = progress and self.main
        self.device = check_runtime(cfg) if parallel is None else parallel.ctx.device
        self.eval_seq_len = _check_positions(model_config, cfg)
        self.lock = RunLock(self.run_dir)
        try:
            if self.main:
                self.lock.acquire()
        except RunLockedError as err:
            raise TrainingError(str(err)) from None
        try:
            self._build(resume, callback)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, resume: bool, callback: Callable[[dict[str, Any]], Any] | None) -> None:
        model_config, cfg = self.mc, self.cfg
        existing = checkpoint.latest(self.run_dir)
        if existing is not None and not resume:
            raise TrainingError(
                f"{self.run_dir} already holds checkpoints (newest {existing.name}); pass "
                "resume=True (--resume) to continue it, or choose a new output folder"
            )
        self.dataset = load_dataset(model_config.vocab_size, cfg.data)
        _check_token_streams(self.dataset, model_config.vocab_size)
        self.model = LongCatLM(model_config)
        scale = model_config.hidden_size / cfg.proxy_hidden_size if cfg.proxy_hidden_size else 1.0
        growth.init_with_transfer(self.model, width_factor=scale, generator=torch.Generator().manual_seed(cfg.seed))
        self.model.to(self.device).train()
        speed.prepare(self.model, cfg)  # TrainConfig.torch_compile (docs/design.md §15)
        self.rows = slice(None)  # this rank's rows of every global batch
        if self.parallel is not None:
            self.parallel.shard(self.model)
            self.rows = self.parallel.ctx.rows(cfg.batch_size)
        self.optimizer = growth.adamw(self.model, cfg, width_factor=scale)
        self.controller = BiasController(cfg.controller, self.model)
        self.sampler = self.build_sampler()
        make_telemetry = Telemetry if self.parallel is None else self.parallel.telemetry
        self.telemetry = make_telemetry(cfg, model_config, self.device, self.run_dir / "metrics.jsonl", callback)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.steps_done = self.tokens_seen = self.skipped_total = self.consecutive_skips = self.sdc_mismatches = 0
        self.val_loss: dict[str, float] = {}
        self.val_step: int | None = None
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        if resume and existing is not None:
            existing = self._newest_good_checkpoint()
            diffs = config_diffs(self, existing)
            if diffs:
                raise TrainingError(
                    f"cannot resume {self.run_dir}: the configuration differs from the checkpoint's "
                    f"({'; '.join(diffs[:4])}); resume with the same settings or use a new --out"
                )
            restore(self, existing)
            self.telemetry.truncate(self.steps_done)
            self.last_checkpoint = existing
        else:
            if self.main:
                self.telemetry.path.unlink(missing_ok=True)
            if cfg.init_from:
                init_from(self, cfg.init_from)

    def build_sampler(self):
        """The batch source: `batch(mixture, batch_size, seq_len)` -> (x, y) or (x, y, segment_ids), with
        `state_dict`/`load_state_dict` (the data position). Fine-tuning (`train.sft.SFTTrainer`) swaps in its own."""
        return MixtureSampler(self.dataset.train, seed=self.cfg.seed)

    def _newest_good_checkpoint(self) -> Path:
        """The newest checkpoint that verifies; newer, damaged ones are moved aside (never deleted), each with a
        one-line warning. None verifying is a TrainingError that changes nothing."""
        good, bad = checkpoint.newest_verified(self.run_dir)
        if good is None:
            raise TrainingError(
                f"cannot resume {self.run_dir}: none of its checkpoints verifies (newest: {bad[0][1]}); nothing "
                "was changed: repair or move them, or start a new --out"
            )
        for ckpt, err in bad if self.main else ():
            moved = checkpoint.move_aside(ckpt)
            log.warning("%s fails verification (%s): moved to %s; resuming from %s", ckpt.name, err, moved, good.name)
        return good

    def close(self) -> None:
        """Give back the run folder's writer lock (`run()` does so when it ends)."""
        self.lock.release()

    # One step --------------------------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One optimizer step: sample, forward and backward every micro-batch, clip, AdamW, controller update; a
        step with a non-finite loss or gradient is skipped (no update, its routing counts dropped)."""
        cfg, index = self.cfg, self.steps_done  # index: 0-based, of the step being taken
        si, _ = stage_at(cfg.stages, index)
        stage = cfg.stages[si]
        lr = lr_at(cfg.stages, index)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        t0 = time.perf_counter()
        batches = []
        for _ in range(cfg.grad_accum):
            batch = self.sampler.batch(stage.mixture, cfg.batch_size, stage.seq_len)
            batches.append(tuple(t[self.rows].to(self.device) for t in batch))
        counts_before = [b.router.expert_counts.clone() for b in self.model.moe_blocks()]
        want_rg = every(cfg.rg_every, index + 1) and bool(self.model.moe_blocks())
        self.optimizer.zero_grad(set_to_none=True)
        # R_g's extra autograd pass and the SDC re-run are diagnostics: their time stays out of tokens/s and MFU.
        run = functools.partial(
            forward_backward, self.model, batches, cfg, self.mc, self.controller.target, stage.mtp_loss_weight
        )
        with self.parallel.global_statistics() if self.parallel else contextlib.nullcontext():
            losses, rg, diag_time, routing = run(want_rg)
            sdc = None
            if every(cfg.sdc_check_every, index + 1):
                t_sdc = time.perf_counter()
                sdc = sdc_check(self.model, self.params, lambda: run(False)[0], losses, counts_before, index + 1)
                self.sdc_mismatches += not sdc["match"]
                diag_time += time.perf_counter() - t_sdc
        if self.parallel is not None:  # gradients, losses and the routers' counts over all ranks; global clip
            losses, grad_norm = self.parallel.synchronize(self.model, losses, cfg.grad_clip)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        values = dict(zip(("loss", "lm_loss", *step_loss_keys(self.model)), losses.mean(0).tolist()))
        finite = math.isfinite(values["loss"]) and math.isfinite(grad_norm)
        report: dict[str, Any] = {}
        health = None
        if finite:
            self.optimizer.step()
            report = self.controller.step()
            self.consecutive_skips = 0
            if want_rg and routing is not None:
                health = metrics.routing_health(routing, self.model)
        else:
            for b in self.model.moe_blocks():  # this step's selections must not reach the next update
                b.router.expert_counts.zero_()
            self.skipped_total += 1
            self.consecutive_skips += 1
            log.warning(
                "step %d skipped: non-finite %s (%d in a row)",
                index + 1,
                "loss" if not math.isfinite(values["loss"]) else "gradient",
                self.consecutive_skips,
            )
        del routing
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(1e-9, time.perf_counter() - t0 - diag_time)
        tokens = cfg.batch_size * cfg.grad_accum * stage.seq_len
        self.tokens_seen += tokens
        self.steps_done = index + 1
        return StepResult(
            self.steps_done,
            si,
            lr,
            values,
            grad_norm,
            not finite,
            tokens,
            self.tokens_seen,
            self.skipped_total,
            elapsed,
            report,
            rg,
            metrics.router_cosine_similarity(self.model) if want_rg else None,
            health,
            sdc,
        )

    # The run ---------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        self.last_checkpoint = save_checkpoint(self)
        return self.last_checkpoint

    def run_eval(self) -> None:
        self.val_loss = evaluate(
            self.model, self.dataset, self.eval_seq_len, self.cfg.eval_windows, self.cfg.batch_size, self.cfg.bf16
        )
        self.val_step = self.steps_done
        self.telemetry.write_eval(self.steps_done, self.val_loss)
        # The evaluator's cheap subset (longcat_lab.eval): bits per byte on the same windows, one more forward, so
        # runs with different vocabularies compare; eval mode, so training state and the routers' counts stay put.
        bpb = bits_per_byte(self.model, self.dataset, self.eval_seq_len, self.cfg.eval_windows, compressors=False)
        self.telemetry.write(
            {
                "kind": "eval_bpb",
                "step": self.steps_done,
                "bits_per_byte": {d: r.model for d, r in bpb.items()},
                "unigram_bits_per_byte": {d: r.unigram for d, r in bpb.items()},
            }
        )

    def run(self) -> TrainResult:
        """Train to the end of the schedule (or `stop_after`), evaluating and saving on the way; every run ends
        with a checkpoint at its last step."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.total_steps
        end = min(total, cfg.stop_after) if cfg.stop_after else total
        self.telemetry.start(
            {
                "step": self.steps_done,
                "resumed_from": self.resumed_from,
                "total_steps": total,
                "num_params": self.model.num_params(),
                "device": str(self.device),
                "data": self.dataset.summary(),
                "data_filter": self.dataset.report,
            }
        )
        with ProgressBar(total, self.steps_done, self.progress) as bar:
            while self.steps_done < end:
                row = self.telemetry.row(self.step())
                self.telemetry.write(row)
                bar.update(row)
                if self.consecutive_skips >= cfg.max_consecutive_skips:
                    where = (
                        f"the last good checkpoint is {self.last_checkpoint}"
                        if self.last_checkpoint
                        else "no checkpoint was written"
                    )
                    raise TrainingError(
                        f"training stopped at step {self.steps_done}: {self.consecutive_skips} "
                        f"consecutive steps had a non-finite loss or gradient "
                        f"(max_consecutive_skips={cfg.max_consecutive_skips}); {where}"
                    )
                last = self.steps_done == end
                if last or every(cfg.eval_every, self.steps_done):
                    self.run_eval()
                if last or every(cfg.ckpt_every, self.steps_done):
                    self.save()
        if self.last_checkpoint is None or checkpoint.step_dir_name(self.steps_done) != self.last_checkpoint.name:
            # Nothing to train (already at the end) but no checkpoint at this step: write one, as every run does.
            if self.val_step != self.steps_done:
                self.run_eval()
            self.save()
        if not self.val_loss:
            self.run_eval()
        return TrainResult(
            self.run_dir,
            self.model.eval(),
            self.dataset.tokenizer,
            self.dataset,
            self.steps_done,
            dict(self.val_loss),
            self.last_checkpoint,
            self.skipped_total,
            dict(self.telemetry.alerts.counts),
            self.sdc_mismatches,
            self.resumed_from,
        )


@contextlib.contextmanager
def _threads(n: int):
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _deterministic(on: bool):
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> TrainResult:
    """Train `model_config` with `train_config`, writing metrics.jsonl and checkpoints under `out_dir`.

    resume=True continues from the newest checkpoint in `out_dir` (none: a fresh start) and reproduces the losses
    of an uninterrupted run bit for bit; resume=False refuses a folder that already holds checkpoints. A run that
    already reached its last step trains nothing and returns the final state. Every run ends with a checkpoint.
    A config with `sft_data` fine-tunes on those dialogues (`train.sft`, which sets it up from a checkpoint)."""
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    check_runtime(train_config)  # before the thread count is applied: a huge one crashes the process
    with _threads(train_config.num_threads), _deterministic(train_config.deterministic):
        if train_config.sft_data:
            from longcat_lab.train.sft import SFTTrainer

            return SFTTrainer(model_config, train_config, out_dir, resume, progress, callback).run()
        return Trainer(model_config, train_config, out_dir, resume, progress, callback).run()


__all__ = ["Trainer", "TrainResult", "TrainingError", "train", "resolve_device", "check_runtime"]
