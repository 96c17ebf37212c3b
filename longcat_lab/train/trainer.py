"""The trainer: multi-stage AdamW training on the built-in data, with the budget controller, auxiliary losses,
telemetry, checkpoints that resume bit for bit, skipped non-finite steps and a deterministic re-run (SDC) check.

- `train(model_config, train_config, out_dir, resume=False, progress=True, callback=None) -> TrainResult`: the
  entry point; `callback(row)` receives every metrics row as it is written (live plots: `viz.training.LivePlot`).
- `Trainer`: one run, on one process or, handed a parallelism strategy (`train.parallelism`,
  `train.distributed.DataExpertParallel`, docs/design.md §8.3), each rank's part of it. Its constructor builds
  everything (data, model, optimizer, controller, sampler, telemetry) and, with `resume=True`, restores the newest
  checkpoint; `step()` takes one optimizer step (its forward and backward and the SDC re-run are `train.step`'s)
  and returns a `StepResult`, which `Telemetry.row` turns into the metrics row; `run()` loops, evaluates and saves.
  Fine-tuning is a subclass with its own config (`train.sft.SFTTrainer`, `SFTConfig`).

A checkpoint holds the model and the trainer's `states()`, each `Stateful` (optimizer, controller, sampler, RNG,
alert state, the routers' pending counts and the run's `Progress`): everything the next step reads. Resume:
`resume=True` continues from the newest checkpoint of `out_dir` that verifies (a fresh start when there is none;
newer, damaged ones are moved aside with a warning) and logs exactly the losses of an uninterrupted run; it refuses
a configuration that differs from the checkpoint's except in the fields marked `FREE_ON_RESUME` (`train.config`;
the comparison and the reading back are `train.resume`'s). A finished run trains nothing. A run holds the
folder's writer lock (`train.lock`) from construction to the end of `run()` (or `close()`).

Token ids are checked once, when the token streams are loaded, so the model runs every training micro-batch with
`validate=False` (no host sync for id checks). Paper references: AdamW eps, hidden z-loss and the balance loss,
multi-stage data, determinism and SDC checks (docs/design.md §2-3); growth init and width transfer in `growth`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longcat_lab import checkpoint
from longcat_lab.data import MixtureSampler, load_dataset
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM
from longcat_lab.train import evaluation, growth, metrics, speed
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.control import BiasController
from longcat_lab.train.lock import RunLock, RunLockedError
from longcat_lab.train.parallelism import Parallelism, SingleProcess
from longcat_lab.train.progress import Progress, RouterCounts
from longcat_lab.train.results import TrainingError, TrainResult
from longcat_lab.train.resume import config_diffs, newest_good_checkpoint, read_trainer_state
from longcat_lab.train.runtime import check_positions, check_runtime, check_token_streams, run_trainer
from longcat_lab.train.schedule import every, lr_at, stage_at
from longcat_lab.train.step import StepResult, forward_backward, sdc_check, step_loss_keys
from longcat_lab.train.telemetry import ProgressBar

log = logging.getLogger(__name__)


class Trainer:
    """One run: owns the model, optimizer, controller, sampler, telemetry and the run folder. `train()` is the
    entry point; the constructor builds (and with `resume`, restores) everything, `step()` takes one step."""

    config_class: type[TrainConfig] = TrainConfig  # the config this trainer trains (a subclass has its own)

    def __init__(
        self,
        model_config: ModelConfig,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        resume: bool = False,
        progress: bool = True,
        callback: Callable[[dict[str, Any]], Any] | None = None,
        parallel: Parallelism | None = None,
    ):
        if type(cfg) is not self.config_class:
            raise ValueError(
                f"train_config is a {type(cfg).__name__}: {type(self).__name__} trains a "
                f"{self.config_class.__name__} (fine-tuning with an SFTConfig: train.sft.train_sft)"
            )
        self.mc, self.cfg, self.run_dir = model_config, cfg, Path(out_dir)
        self.parallel = parallel if parallel is not None else SingleProcess()
        # On several ranks, rank 0 holds the lock, logs and draws the bar.
        self.main = self.parallel.is_main
        self.show_progress = progress and self.main
        self.device = self.parallel.device(cfg)
        self.eval_seq_len = check_positions(model_config, cfg)
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
        check_token_streams(self.dataset, model_config.vocab_size)
        self.model = LongCatLM(model_config)
        scale = model_config.hidden_size / cfg.proxy_hidden_size if cfg.proxy_hidden_size else 1.0
        growth.init_with_transfer(self.model, width_factor=scale, generator=torch.Generator().manual_seed(cfg.seed))
        self.model.to(self.device).train()
        speed.prepare(self.model, cfg)  # TrainConfig.torch_compile (docs/design.md §3.4)
        self.parallel.shard(self.model)
        self.rows = self.parallel.rows(cfg.batch_size)  # this rank's rows of every global batch
        self.optimizer = growth.adamw(self.model, cfg, width_factor=scale)
        self.controller = BiasController(cfg.controller, self.model)
        self.sampler = self.build_sampler()
        self.rng = checkpoint.RNGState(self.device)
        self.telemetry = self.parallel.telemetry(
            cfg, model_config, self.device, self.run_dir / "metrics.jsonl", callback
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.progress = Progress(cfg.stages)
        self.router_counts = RouterCounts(self.model, self.main)
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        if resume and existing is not None:
            self._resume(newest_good_checkpoint(self.run_dir, move_bad=self.main))
        else:
            if self.main:
                self.telemetry.path.unlink(missing_ok=True)
            if cfg.init_from:
                self._init_from(cfg.init_from)

    def build_sampler(self):
        """The batch source: `batch(mixture, batch_size, seq_len)` -> (x, y) or (x, y, segment_ids), with
        `state_dict`/`load_state_dict` (the data position). Fine-tuning (`train.sft.SFTTrainer`) swaps in its own."""
        return MixtureSampler(self.dataset.train, seed=self.cfg.seed)

    # Checkpoints ------------------------------------------------------------------------------------------------
    def states(self) -> dict[str, Any]:
        """What a checkpoint holds beside the model, by name (the entries of trainer_state.pt): everything the next
        step reads, so that a resume continues bit for bit."""
        return {
            "optimizer": self.optimizer,
            "controller": self.controller,
            "sampler": self.sampler,
            "rng": self.rng,
            "alerts": self.telemetry.alerts,
            "expert_counts": self.router_counts,
            "trainer": self.progress,
        }

    def _resume(self, ckpt: Path) -> None:
        """Continue from checkpoint `ckpt` (of any layout, `parallel.sharding` reshards it): the configs must match,
        then the model and every state are loaded and the metrics of later steps dropped."""
        diffs = config_diffs(ckpt, self.mc, self.cfg)
        if diffs:
            raise TrainingError(
                f"cannot resume {self.run_dir}: the configuration differs from the checkpoint's "
                f"({'; '.join(diffs[:4])}); resume with the same settings or use a new --out"
            )
        saved = read_trainer_state(ckpt)
        checkpoint.load_states(ckpt, self.states(), model=self.model, saved=saved, sharding=self.parallel.sharding)
        self.resumed_from = self.progress.step
        self.telemetry.truncate(self.progress.step)
        self.last_checkpoint = ckpt

    def _init_from(self, source: str) -> None:
        """Growth init (`growth.init_from_checkpoint`); with `init_keep_state`, also the source run's step counter
        and data position (the optimizer starts fresh)."""
        meta = growth.init_from_checkpoint(self.model, source)
        if self.cfg.init_keep_state:
            ckpt, theirs = checkpoint.resolve(source), Progress(self.cfg.stages)
            checkpoint.load_states(ckpt, {"sampler": self.sampler, "trainer": theirs}, saved=read_trainer_state(ckpt))
            self.progress.step = self.resumed_from = meta["step"]
            self.progress.tokens_seen = theirs.tokens_seen

    def save(self) -> Path:
        """Write the checkpoint of the current step (on several ranks, every rank calls it), keeping the newest
        `keep_checkpoints`."""
        p = self.progress
        stage = self.cfg.stages[stage_at(self.cfg.stages, max(0, p.step - 1))[0]]
        meta = {
            "seed": self.cfg.seed,
            "stage": stage.name,
            "tokens_seen": p.tokens_seen,
            "val_loss": p.val_loss,
            "val_loss_step": p.val_step,
            "data_key": self.dataset.key,
            "total_steps": self.cfg.total_steps,
        }
        self.last_checkpoint = checkpoint.save(
            self.run_dir,
            p.step,
            self.model,
            self.dataset.tokenizer,
            self.cfg.to_dict(),
            self.states(),
            meta,
            keep=self.cfg.keep_checkpoints,
            sharding=self.parallel.sharding,
        )
        return self.last_checkpoint

    def close(self) -> None:
        """Give back the run folder's writer lock (`run()` does so when it ends)."""
        self.lock.release()

    # One step --------------------------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One optimizer step: sample, forward and backward every micro-batch, clip, AdamW, controller update; a
        step with a non-finite loss or gradient is skipped (no update, its routing counts dropped)."""
        cfg, p = self.cfg, self.progress
        index = p.step  # 0-based, of the step being taken
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
        with self.parallel.global_statistics():
            losses, rg, diag_time, routing = run(want_rg)
            sdc = None
            if every(cfg.sdc_check_every, index + 1):
                t_sdc = time.perf_counter()
                sdc = sdc_check(self.model, self.params, lambda: run(False)[0], losses, counts_before, index + 1)
                p.sdc_mismatches += not sdc["match"]
                diag_time += time.perf_counter() - t_sdc
        # Gradients, losses and the routers' counts of the whole run (several ranks: summed), clipped globally.
        losses, grad_norm = self.parallel.synchronize(self.model, losses, cfg.grad_clip)
        values = dict(zip(("loss", "lm_loss", *step_loss_keys(self.model)), losses.mean(0).tolist()))
        finite = math.isfinite(values["loss"]) and math.isfinite(grad_norm)
        report: dict[str, Any] = {}
        health = None
        t_stats = time.perf_counter()  # a diagnostic too (two host syncs): outside tokens/s and MFU
        routing_stats = metrics.step_routing_stats(routing) if routing is not None else None
        diag_time += time.perf_counter() - t_stats
        if finite:
            self.optimizer.step()
            report = self.controller.step()
            p.consecutive_skips = 0
            if want_rg and routing is not None:
                health = metrics.routing_health(routing, self.model)
        else:
            for b in self.model.moe_blocks():  # this step's selections must not reach the next update
                b.router.expert_counts.zero_()
            p.skipped_total += 1
            p.consecutive_skips += 1
            log.warning(
                "step %d skipped: non-finite %s (%d in a row)",
                index + 1,
                "loss" if not math.isfinite(values["loss"]) else "gradient",
                p.consecutive_skips,
            )
        del routing
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(1e-9, time.perf_counter() - t0 - diag_time)
        tokens = cfg.batch_size * cfg.grad_accum * stage.seq_len
        p.tokens_seen += tokens
        p.step = index + 1
        return StepResult(
            step=p.step,
            stage_index=si,
            lr=lr,
            losses=values,
            grad_norm=grad_norm,
            skipped=not finite,
            tokens=tokens,
            tokens_seen=p.tokens_seen,
            skipped_total=p.skipped_total,
            seconds=elapsed,
            controller=report,
            rg=rg,
            router_cosine=metrics.router_cosine_similarity(self.model) if want_rg else None,
            health=health,
            routing_stats=routing_stats,
            sdc=sdc,
        )

    # The run ---------------------------------------------------------------------------------------------------
    def run_eval(self) -> None:
        p = self.progress
        p.val_loss = evaluation.evaluate(
            self.model, self.dataset, self.eval_seq_len, self.cfg.eval_windows, self.cfg.batch_size, self.cfg.bf16
        )
        p.val_step = p.step
        self.telemetry.write_eval(p.step, p.val_loss)
        # The evaluator's cheap subset (longcat_lab.eval): bits per byte on the same windows, one more forward, so
        # runs with different vocabularies compare; eval mode, so training state and the routers' counts stay put.
        bpb = evaluation.bits_per_byte(self.model, self.dataset, self.eval_seq_len, self.cfg.eval_windows)
        self.telemetry.write(
            {
                "kind": "eval_bpb",
                "step": p.step,
                "bits_per_byte": {d: r["model"] for d, r in bpb.items()},
                "unigram_bits_per_byte": {d: r["unigram"] for d, r in bpb.items()},
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
        cfg, p = self.cfg, self.progress
        total = cfg.total_steps
        end = min(total, cfg.stop_after) if cfg.stop_after else total
        self.telemetry.start(
            {
                "step": p.step,
                "resumed_from": self.resumed_from,
                "total_steps": total,
                "num_params": self.model.num_params(),
                "device": str(self.device),
                "data": self.dataset.summary(),
                "data_filter": self.dataset.report,
            }
        )
        with ProgressBar(total, p.step, self.show_progress) as bar:
            while p.step < end:
                row = self.telemetry.row(self.step())
                self.telemetry.write(row)
                bar.update(row)
                if p.consecutive_skips >= cfg.max_consecutive_skips:
                    where = (
                        f"the last good checkpoint is {self.last_checkpoint}"
                        if self.last_checkpoint
                        else "no checkpoint was written"
                    )
                    raise TrainingError(
                        f"training stopped at step {p.step}: {p.consecutive_skips} "
                        f"consecutive steps had a non-finite loss or gradient "
                        f"(max_consecutive_skips={cfg.max_consecutive_skips}); {where}"
                    )
                last = p.step == end
                if last or every(cfg.eval_every, p.step):
                    self.run_eval()
                if last or every(cfg.ckpt_every, p.step):
                    self.save()
        if self.last_checkpoint is None or checkpoint.step_dir_name(p.step) != self.last_checkpoint.name:
            # Nothing to train (already at the end) but no checkpoint at this step: write one, as every run does.
            if p.val_step != p.step:
                self.run_eval()
            self.save()
        if not p.val_loss:
            self.run_eval()
        return TrainResult(
            run_dir=self.run_dir,
            model=self.model.eval(),
            tokenizer=self.dataset.tokenizer,
            dataset=self.dataset,
            step=p.step,
            val_loss=dict(p.val_loss),
            checkpoint=self.last_checkpoint,
            skipped_steps=p.skipped_total,
            alert_counts=dict(self.telemetry.alerts.counts),
            sdc_mismatches=p.sdc_mismatches,
            resumed_from=self.resumed_from,
        )


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
    Fine-tuning (an `SFTConfig`) is `train.sft.train_sft`."""
    return run_trainer(Trainer, model_config, train_config, out_dir, resume, progress, callback)


__all__ = ["Trainer", "TrainResult", "TrainingError", "train", "check_runtime"]
