"""Tests of training on several processes (`train.distributed`, `parallel.mesh`, `checkpoint.sharded`, the torchrun
launcher of `longcat-lab train --nproc`), on two gloo ranks with one thread each.

One spawn of two ranks trains four runs in turn: data parallel, data + expert parallel, and two resumes that change
the layout (a data-parallel checkpoint and a single-process checkpoint, continued with the experts sharded). One
process trains the reference with the same global batch. Then: 2 ranks give the reference's losses within 3e-5 over
20 steps, every rank ends with the same expert bias, metrics are written once, sharded checkpoints resume on one
process and convert to a single-process checkpoint and a Hugging Face export. The slow test kills a rank with
SIGKILL under torchrun and checks that the restarted group logs the uninterrupted run's losses.

Run: `.venv/bin/python -m pytest tests/parallel/test_distributed.py -q` (about a minute on two cores; the killed-rank
test another 30-40 s).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longcat_lab import checkpoint
from longcat_lab.cli import main
from longcat_lab.cli.train import worker_argv
from longcat_lab.export import load_hf, save_hf
from longcat_lab.model import presets
from longcat_lab.testing import tiny_train_config
from longcat_lab.train import read_metrics, train
from longcat_lab.train.distributed import consolidate, train_ranks

CONFIG = presets.tiny()
STEPS = 20
# Ranks sum gradients in another order than one process, so fp32 losses part by about 1e-6 a step: 1.1e-5 at step 20
# with the pid controller (the default). A rank out of step (its own bias or batch) is caught by the bias check too.
TOL = 3e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "longcat_lab_cache")


def config(cache):
    # A global batch of 4 sequences: 2 per rank. Checkpoints at 10 and 20; the evaluation at the end only.
    return tiny_train_config(cache, STEPS, eval_every=0, eval_windows=2, ckpt_every=10)


def losses(run_dir, first: int = 1) -> list[float]:
    rows = read_metrics(Path(run_dir) / "metrics.jsonl", "train")
    assert [r["step"] for r in rows] == list(range(first, STEPS + 1)), "one row per step, written once"
    return [r["loss"] for r in rows]


def assert_close(got, ref):
    assert len(got) == len(ref)
    worst = max(abs(a - b) for a, b in zip(got, ref))
    assert worst <= TOL, f"largest loss difference {worst:.2e} > {TOL}"


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(CONFIG, config(cache), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def ranks(single, cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    runs = [
        {"out_dir": str(root / "dp"), "ep": 1},
        {"out_dir": str(root / "ep"), "ep": 2},
        {"out_dir": str(root / "dp_to_ep"), "ep": 2, "start_from": str(root / "dp/checkpoints/step_000010")},
        {"out_dir": str(root / "single_to_ep"), "ep": 2, "start_from": str(single / "checkpoints/step_000010")},
    ]
    return root, train_ranks(CONFIG, config(cache), runs, nproc=2)


@pytest.mark.parametrize("layout", ["dp", "ep"])
def test_two_ranks_give_the_losses_of_one_process_with_the_whole_batch(single, ranks, layout):
    root, _ = ranks
    assert_close(losses(root / layout), losses(single))
    start = read_metrics(root / layout / "metrics.jsonl", "start")
    assert [(r["ranks"], r["ep"]) for r in start] == [(2, 1 if layout == "dp" else 2)]
    ref_rows = read_metrics(single / "metrics.jsonl", "train")
    rows = read_metrics(root / layout / "metrics.jsonl", "train")
    # tokens/s counts the global batch: the same tokens per step as the single process.
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref_rows]


def test_every_rank_holds_the_same_expert_bias(single, ranks):
    _, per_rank = ranks
    for job in range(4):
        biases = [r[job]["bias"] for r in per_rank]
        assert any(b.abs().max() > 0 for b in biases[0]), "the controller moved the bias"
        for b0, b1 in zip(*biases):
            assert torch.equal(b0, b1)
    # ... and the bias of the single process with the same batch.
    whole, _, _ = checkpoint.load(single)
    for block, b in zip(whole.moe_blocks(), per_rank[0][1]["bias"]):
        torch.testing.assert_close(b, block.router.e_score_correction_bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["dp_to_ep", "single_to_ep"])
def test_a_checkpoint_resumes_on_another_layout(single, ranks, source):
    root, per_rank = ranks
    job = 2 if source == "dp_to_ep" else 3
    assert per_rank[0][job]["resumed_from"] == 10
    assert_close(losses(root / source, first=11), losses(single)[10:])


def test_a_sharded_checkpoint_resumes_on_one_process(single, ranks, cache, tmp_path, one_thread):
    root, _ = ranks
    ckpt = root / "ep/checkpoints/step_000010"
    assert checkpoint.is_sharded(ckpt) and not (ckpt / "model.safetensors").exists()
    shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name)
    result = train(CONFIG, config(cache), tmp_path, resume=True, progress=False)
    assert result.resumed_from == 10
    assert_close(losses(tmp_path, first=11), losses(single)[10:])


def test_a_sharded_checkpoint_converts_to_single_process_and_hf(single, ranks, tmp_path):
    root, _ = ranks
    sharded = root / "ep/checkpoints/step_000020"
    meta = checkpoint.verify(sharded)
    assert (meta["layout"], meta["ranks"], meta["ep"]) == ("dcp", 2, 2)
    assert meta["num_params"] == checkpoint.load(single)[0].num_params()  # the whole model's, not a rank's
    plain = consolidate(sharded, tmp_path / "plain")
    assert (plain / "model.safetensors").is_file() and not checkpoint.is_sharded(plain)
    a, _, _ = checkpoint.load(sharded)
    b, _, meta_b = checkpoint.load(plain)
    assert meta_b["step"] == 20
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    # The optimizer moments come along: the expert rows of both ranks, in torch's own layout.
    state = checkpoint.read_trainer_state(plain)["optimizer"]["state"]
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state.values())
    assert shapes == sorted(tuple(p.shape) for p in b.parameters())
    save_hf(a, tmp_path / "hf")
    for (name, x), y in zip(a.state_dict().items(), load_hf(tmp_path / "hf").state_dict().values()):
        assert torch.equal(x, y), name


def test_launcher_flags_and_bad_input(tmp_path):
    argv = ["train", "--nproc", "2", "--max-restarts=1", "--ep", "2", "--nnodes", "1", "--out", "x"]
    assert worker_argv(argv) == ["train", "--ep", "2", "--out", "x"]
    assert main(["train", "--preset", "tiny", "--ep", "2", "--out", str(tmp_path / "a")]) == 2
    assert main(["train", "--preset", "tiny", "--nproc", "2", "--ep", "3", "--out", str(tmp_path / "b")]) == 2
    assert main(["train", "--preset", "tiny", "--nproc", "0", "--out", str(tmp_path / "c")]) == 2
    odd = ["--set", "batch_size=5", "--out", str(tmp_path / "d")]
    assert main(["train", "--preset", "tiny", "--nproc", "2", *odd]) == 2
    assert not (tmp_path / "d").exists(), "refused before anything started"


def _worker_pid(rank: int, run_id_parent: int) -> int | None:
    """The pid of torchrun worker `rank` below the launcher process `run_id_parent` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"TORCHELASTIC_RUN_ID" in b"".join(env) and f"RANK={rank}".encode() in env:
            pid, ppid = int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == run_id_parent or _parent(ppid) == run_id_parent:
                return pid
    return None


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank to kill through /proc (Linux)")
def test_a_killed_rank_restarts_and_the_run_resumes(ranks, cache, tmp_path):
    root, _ = ranks
    out = tmp_path / "killed"
    sets = {
        "batch_size": 4,
        "num_threads": 1,
        "peak_flops": 1e10,
        "max_bytes_per_domain": 150_000,
        "tokenizer_sample_bytes": 60_000,
        "cache_dir": cache,
        "eval_every": 0,
        "eval_windows": 2,
        "ckpt_every": 10,
    }
    cmd = [sys.executable, "-m", "longcat_lab", "train", "--nproc", "2", "--ep", "2", "--max-restarts", "1"]
    cmd += ["--preset", "tiny", "--steps", str(STEPS), "--out", str(out), "--no-progress", "--samples", "0"]
    cmd += ["--eval", "none", *(f"--set={k}={v}" for k, v in sets.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "torchrun.log"  # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            rows = read_metrics(out / "metrics.jsonl", "train") if (out / "metrics.jsonl").is_file() else []
            if rows and rows[-1]["step"] >= 11:  # the checkpoint of step 10 is written: kill -9 rank 1
                pid = _worker_pid(1, proc.pid)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = rows[-1]["step"]
            time.sleep(0.02)
        proc.wait(timeout=240)
        log = log_path.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None and killed < STEPS, f"the run ended before a rank could be killed:\n{log[-3000:]}"
    assert proc.returncode == 0, log[-3000:]
    starts = read_metrics(out / "metrics.jsonl", "start")
    assert [s["resumed_from"] for s in starts] == [None, 10], "torchrun restarted the group, which resumed at 10"
    assert losses(out) == losses(root / "ep"), "the losses of the uninterrupted run, bit for bit"
