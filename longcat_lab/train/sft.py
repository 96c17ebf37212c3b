"""Supervised fine-tuning into an agent (docs/design.md §5.4): a pre-trained checkpoint trained further on verified
tool-use dialogues (`longcat-lab synth`), with the loss on the assistant's tokens only, packed rows whose
dialogues never see each other, and a stated fraction of pre-training rows against forgetting. It is the
trainer's run, not a second trainer: the same checkpoints, resume, metrics and evaluations, with the batch source
swapped (`Trainer.build_sampler`), one more evaluation, and a config of its own (`SFTConfig`: a TrainConfig plus the
dialogues).

- `finetune(init_from, data, out_dir, steps=None, resume=False, progress=True, **overrides) -> TrainResult`: the
  entry point; `data` is a JSONL of synth records or a list of them, copied into the run folder
  (`sft_data.jsonl`), so a run folder holds everything its resume needs.
- `prepare(...) -> (ModelConfig, SFTConfig)`: the configs `finetune` trains with (the CLI's first half), and
  `train_sft(model_config, sft_config, out_dir, ...)`, the second (`train.train` for fine-tuning).
- `sft_config(source_train_config, ...) -> SFTConfig`: the schedule derived from the source run's config: one
  stage at `SEQ_LEN` (a context that holds a whole dialogue of the easier cells), `LR`, the source's
  last mixture for the pre-training rows, its data config (hence its tokenizer) and seed.
- `SFTTrainer`: `Trainer` with the dialogue sampler (`data.sft.SFTSampler`) and, at every evaluation and once
  before the first step, the loss on held-out dialogues (`sft_val_loss` rows, `kind: "eval_sft"`), beside the
  pre-training validation loss that shows forgetting.
- `sft_loss(model, rows, batch_size)`: mean loss per assistant token of packed rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from longcat_lab import checkpoint
from longcat_lab._util import atomic_write_bytes, check_int
from longcat_lab.data.mixture import MixtureSampler
from longcat_lab.data.sft import (
    PackedRows,
    SFTSampler,
    encode_dialogue,
    load_records,
    pack_dialogues,
    records_digest,
    split_held_out,
)
from longcat_lab.data.tokenizer import eot_id
from longcat_lab.model.config import IGNORE_INDEX, ModelConfig
from longcat_lab.model.model import LongCatLM
from longcat_lab.train.config import SFTConfig, StageConfig, TrainConfig
from longcat_lab.train.lock import LOCK_NAME
from longcat_lab.train.overrides import apply_overrides
from longcat_lab.train.results import TrainResult
from longcat_lab.train.resume import read_train_config
from longcat_lab.train.runtime import run_trainer
from longcat_lab.train.trainer import Trainer

# The schedule's defaults (docs/design.md §5.4). STEPS of GRAD_ACCUM x BATCH_SIZE rows of SEQ_LEN positions, the
# 8,192 tokens a step that 8 rows of 1,024 were before the context grew, take about a quarter of an hour for the small
# preset on two quiet CPU cores (benchmarks/RESULTS.md "sft"). LR is a third of the source's peak: the model is
# already trained, and large steps on a narrow data set are what cause forgetting.
STEPS = 80
LR = 1e-3
BATCH_SIZE = 4
GRAD_ACCUM = 1
SEQ_LEN = 2048  # raised over the source model's context when longer (docs/design.md §5.4)
DATA_FILE = "sft_data.jsonl"
# Keys of `finetune`'s overrides that set the stage rather than a TrainConfig field.
STAGE_KEYS = ("lr", "seq_len", "warmup")


@torch.no_grad()
def sft_loss(model: LongCatLM, rows: PackedRows, batch_size: int = 8, bf16: bool = False) -> float:
    """Mean cross-entropy (nats) per trained token of packed rows, in eval mode (the routers count nothing)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            x, y, seg = (t[i : i + batch_size].to(model.device) for t in (rows.x, rows.y, rows.segment_ids))
            n = int((y != IGNORE_INDEX).sum())
            if not n:
                continue
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x, targets=y, validate=False, segment_ids=seg).loss
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


class SFTTrainer(Trainer):
    """A `Trainer` of an `SFTConfig`, whose batches are packed dialogue rows mixed with pre-training rows."""

    config_class = SFTConfig
    cfg: SFTConfig

    def build_sampler(self) -> SFTSampler:
        cfg = self.cfg
        records = load_records(cfg.sft_data)
        if cfg.sft_data_sha256 and records_digest(records) != cfg.sft_data_sha256:
            raise ValueError(
                f"sft_data={cfg.sft_data!r} is not allowed: its records changed since this run was configured "
                f"(sha256 {cfg.sft_data_sha256[:12]}...); restore the file or start a new run"
            )
        tok, seq_len = self.dataset.tokenizer, cfg.stages[-1].seq_len
        encoded = {id(r): encode_dialogue(r, tok) for r in records}
        if cfg.sft_long_dialogues == "drop":
            kept = [r for r in records if len(encoded[id(r)].ids) <= seq_len + 1]
            if len(kept) <= cfg.sft_val_dialogues:
                raise ValueError(
                    f"sft_data={cfg.sft_data!r} is not allowed: {len(kept)} of its {len(records)} dialogues fit the "
                    f"{seq_len}-token context, and {cfg.sft_val_dialogues} are held out; give shorter or more "
                    "dialogues, a longer seq_len, or --set sft_long_dialogues=split"
                )
            records = kept
        self.dialogue_counts = {"dialogues_kept": len(records), "dialogues_too_long": len(encoded) - len(records)}
        train_records, held_out = split_held_out(records, cfg.sft_val_dialogues)
        self.held_out = pack_dialogues([encoded[id(r)] for r in held_out], seq_len, eot_id(tok))
        dialogues = [encoded[id(r)] for r in train_records]
        pretrain = MixtureSampler(self.dataset.train, seed=cfg.seed) if cfg.sft_pretrain_ratio else None
        return SFTSampler(dialogues, pretrain, cfg.sft_pretrain_ratio, cfg.seed, eot_id(tok))

    def _build(self, resume: bool, callback) -> None:
        super()._build(resume, callback)
        if self.resumed_from is None and self.cfg.init_from:
            # The dialogues are encoded with the data config's tokenizer; the model must have learned that one.
            source = checkpoint.resolve(self.cfg.init_from) / "tokenizer.json"
            if json.loads(source.read_text()) != json.loads(self.dataset.tokenizer.to_str()):
                raise ValueError(
                    f"init_from={self.cfg.init_from!r} is not allowed: its tokenizer differs from the one this "
                    "data config builds; fine-tune with the source run's data settings"
                )

    def run_eval(self) -> None:
        super().run_eval()
        if self.main:
            loss = (
                sft_loss(self.model, self.held_out, self.cfg.batch_size, self.cfg.bf16) if len(self.held_out) else None
            )
            self.telemetry.write(
                {
                    "kind": "eval_sft",
                    "step": self.progress.step,
                    "sft_val_loss": loss,
                    "held_out_dialogues": self.cfg.sft_val_dialogues,
                    "held_out_targets": self.held_out.targets,
                    **self.dialogue_counts,
                    **self.sampler.counts,
                }
            )

    def _run(self) -> TrainResult:
        if self.progress.step == 0 and self.progress.val_step is None:
            self.run_eval()  # the source checkpoint's losses: the baseline for the gain and for forgetting
        return super()._run()


def sft_config(
    source: TrainConfig,
    init_from: str,
    data_path: str,
    digest: str,
    steps: int | None = None,
    **overrides: Any,
) -> SFTConfig:
    """The fine-tuning config for a checkpoint trained with `source`: its data config, seed, losses and
    controller; one stage "sft" of `steps` (default STEPS) at LR with a 5% warmup and a cosine to 0.1 x LR, at
    SEQ_LEN positions, whose mixture (the pre-training rows') is the source's last; evaluation at the source's
    sequence length, so the pre-training validation loss compares with the source run's. `overrides`: `lr`,
    `seq_len`, `warmup` set the stage, anything else a field of SFTConfig."""
    steps = STEPS if steps is None else steps
    check_int("steps", steps)
    stage_args = {k: overrides.pop(k) for k in STAGE_KEYS if k in overrides}
    stage = StageConfig(
        name="sft",
        steps=steps,
        lr=stage_args.get("lr", LR),
        warmup=stage_args.get("warmup", max(1, round(0.05 * steps))),
        seq_len=stage_args.get("seq_len", SEQ_LEN),
        mixture=dict(source.stages[-1].mixture),
        end_lr_ratio=0.1,
    )
    every = max(1, steps // 2)
    changes = {
        "stages": [stage],
        "batch_size": BATCH_SIZE,
        "grad_accum": GRAD_ACCUM,
        "eval_seq_len": source.eval_seq_len or source.stages[0].seq_len,
        "eval_every": every,
        "ckpt_every": every,
        "keep_checkpoints": 2,
        "stop_after": 0,
        "rg_every": 20,
        "init_from": str(init_from),
        "init_keep_state": False,
        "sft_data": str(data_path),
        "sft_data_sha256": digest,
    }
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"overrides {unknown} are not allowed: use {list(STAGE_KEYS)} or SFTConfig fields (e.g. batch_size)"
        )
    inherited = {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name in known}
    return SFTConfig(**{**inherited, **changes, **overrides})


def _write_data(records: list[dict[str, Any]], digest: str, out_dir: Path) -> Path:
    """The run's copy of the dialogues; an existing copy with other records is refused once checkpoints exist."""
    path = out_dir / DATA_FILE
    if path.is_file():
        if records_digest(load_records(path)) == digest:
            return path
        if checkpoint.latest(out_dir) is not None:
            raise ValueError(
                f"data is not allowed: {out_dir} was fine-tuned on other dialogues ({path}); pass the same "
                "data to resume, or choose a new output folder"
            )
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, body.encode())
    return path


def prepare(
    init_from: str | os.PathLike,
    data: str | os.PathLike | list[dict[str, Any]],
    out_dir: str | os.PathLike,
    steps: int | None = None,
    sets: list[str] | tuple[str, ...] = (),
    **overrides: Any,
) -> tuple[ModelConfig, SFTConfig]:
    """Check the dialogues, copy them into `out_dir` and build the configs: the source checkpoint's ModelConfig and
    `sft_config`, then `sets` (`--set FIELD=VALUE`, as for `longcat-lab train`). `init_from` is a checkpoint
    folder or a run folder (its newest checkpoint)."""
    source = checkpoint.resolve(init_from)
    out = Path(out_dir)
    _check_apart(init_from, source, out)
    checkpoint.verify(source)
    records = load_records(data)
    digest = records_digest(records)
    model_config = checkpoint.read_model_config(source)
    source_cfg = read_train_config(source)
    path = (out / DATA_FILE).resolve()
    cfg = sft_config(source_cfg, str(source), str(path), digest, steps, **overrides)
    # A context longer than the source's: RoPE angles are computed per position, so no weight changes size.
    longest = max(s.seq_len for s in cfg.stages)
    if longest > model_config.max_position_embeddings:
        model_config = model_config.replace(max_position_embeddings=longest)
    model_config, cfg = apply_overrides(model_config, cfg, list(sets))
    split_held_out(records, cfg.sft_val_dialogues)  # a bad held-out count fails before any work
    _write_data(records, digest, out)  # last: a refusal above leaves nothing behind
    return model_config, cfg


def _check_apart(init_from: str | os.PathLike, source: Path, out: Path) -> None:
    """Refuse an output folder that is the source run (or its checkpoint), inside it, or holds it: fine-tuning
    there would rotate the source's checkpoints away and mix two runs' files."""
    out_r, init_r, source_r = out.resolve(), Path(init_from).resolve(), source.resolve()
    for src in (init_r, source_r):
        if out_r == src or src in out_r.parents or out_r in src.parents:
            raise ValueError(
                f"--out={str(out)!r} is not allowed with --init-from={str(init_from)!r}: the output folder must lie "
                "apart from the source run (neither inside the other); choose a new folder"
            )


@contextlib.contextmanager
def cleanup_on_refusal(out_dir: str | os.PathLike) -> Iterator[None]:
    """Run a fine-tuning call; when it raises before any checkpoint of `out_dir` exists, delete what it added there
    (the copy of the dialogues, metrics, the folder itself if it made it), so a refused run leaves nothing behind."""
    out = Path(out_dir)
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        yield
    except BaseException:
        if out.is_dir() and checkpoint.latest(out) is None:
            if before is None:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for entry in set(out.iterdir()) - before - {out / LOCK_NAME}:  # a lock file is never deleted
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
        raise


def train_sft(
    model_config: ModelConfig,
    sft_config: SFTConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> TrainResult:
    """`train` for fine-tuning: an `SFTTrainer` of `sft_config` (from `prepare`), with the same resume rules."""
    return run_trainer(SFTTrainer, model_config, sft_config, out_dir, resume, progress, callback)


def finetune(
    init_from: str | os.PathLike,
    data: str | os.PathLike | list[dict[str, Any]],
    out_dir: str | os.PathLike,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    callback=None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune the checkpoint `init_from` (or a run folder's newest) on `data` (a JSONL of `longcat-lab synth`
    records, or a list of them) into `out_dir`; `resume=True` continues that run from its newest checkpoint (with
    the same arguments). Overrides as `sft_config`. The checkpoints load with `checkpoint.load` like any other."""
    with cleanup_on_refusal(out_dir):
        model_config, cfg = prepare(init_from, data, out_dir, steps, **overrides)
        return train_sft(model_config, cfg, out_dir, resume=resume, progress=progress, callback=callback)


__all__ = [
    "STEPS",
    "LR",
    "BATCH_SIZE",
    "GRAD_ACCUM",
    "SEQ_LEN",
    "SFTTrainer",
    "cleanup_on_refusal",
    "finetune",
    "prepare",
    "sft_config",
    "sft_loss",
    "train_sft",
]
