"""Tests of fine-tuning (longcat_lab.train.sft, the model's `segment_ids`): packed sequences do not see each other
(logits equal those of each sequence alone), the default path is unchanged, and an end-to-end run from a tiny
pre-trained checkpoint: it starts from that checkpoint's weights, its checkpoints load with `checkpoint.load`,
it resumes bit for bit, refuses other data on resume, and the CLI reports bad input in one line.

Run: `.venv/bin/python -m pytest tests/train/test_sft.py -q` (the end-to-end tests are marked slow; the file takes
about 10 s on a quiet machine).
"""

import json

import pytest
import torch

from longcat_lab import checkpoint
from longcat_lab.cli import main
from longcat_lab.eval.recipe import sft_recipe, wall_minutes
from longcat_lab.model import presets
from longcat_lab.model.config import IGNORE_INDEX
from longcat_lab.testing import random_ids, random_model, tiny_train_config
from longcat_lab.train import read_metrics, train
from longcat_lab.train.sft import finetune, prepare

pytestmark = pytest.mark.usefixtures("one_thread")


# The segment mask -------------------------------------------------------------------------------------------
def test_packed_sequences_do_not_see_each_other():
    model = random_model(presets.tiny(), seed=1, bias_std=0.01)
    a, b = random_ids(model.config, (1, 11), seed=2), random_ids(model.config, (1, 7), seed=3)
    pad = torch.zeros(1, 4, dtype=torch.long)
    row = torch.cat([a, b, pad], dim=1)
    seg = torch.tensor([[0] * 11 + [1] * 7 + [-1] * 4])
    with torch.no_grad():
        packed = model(row, segment_ids=seg).logits
        alone_a = model(a).logits
        alone_b = model(b).logits
        leaky = model(row).logits  # without segments b attends to a
    torch.testing.assert_close(packed[:, :11], alone_a, rtol=1e-5, atol=1e-5)
    # b sits at positions 11..17 of the row: RoPE scores depend only on relative positions, so positions need
    # not restart per segment (up to rounding of the larger angles).
    torch.testing.assert_close(packed[:, 11:18], alone_b, rtol=1e-4, atol=1e-4)
    assert (leaky[:, 11:18] - alone_b).abs().max() > 1e-2


def test_one_segment_is_the_causal_path_and_bad_segments_are_refused():
    model = random_model(presets.tiny(), seed=4)
    x = random_ids(model.config, (2, 9), seed=5)
    y = random_ids(model.config, (2, 9), seed=6)
    with torch.no_grad():
        out = model(x, targets=y)
        causal, loss = out.logits, out.loss
        out = model(x, targets=y, segment_ids=torch.zeros(2, 9, dtype=torch.long))
        masked, loss2 = out.logits, out.loss
    torch.testing.assert_close(masked, causal, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids of shape \\(2, 8\\) is not allowed"):
        model(x, segment_ids=torch.zeros(2, 8, dtype=torch.long))


def test_gradients_do_not_cross_segments():
    model = random_model(presets.tiny(), seed=7)
    x = random_ids(model.config, (1, 12), seed=8)
    y = torch.full((1, 12), IGNORE_INDEX)
    y[0, 8:] = random_ids(model.config, (1, 4), seed=9)  # a loss on the second segment only
    seg = torch.tensor([[0] * 6 + [1] * 6])
    emb = model.embed_tokens.weight
    x_emb = emb[x].detach().requires_grad_(True)
    # The same forward as the model's, from embeddings, to read the gradient per input position.
    model.embed_tokens.forward = lambda ids: x_emb
    loss = model(x, targets=y, segment_ids=seg, validate=False).loss
    loss.backward()
    per_position = x_emb.grad.abs().sum(-1)[0]
    assert torch.all(per_position[:6] == 0) and torch.all(per_position[6:9] > 0)


# End to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny pre-trained run and a dozen synthesised dialogues."""
    from longcat_lab.synth.dialogues import generate

    base = tmp_path_factory.mktemp("sft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_train_config(str(base / "cache"), steps=4)
        train(presets.tiny(), cfg, base / "pre", progress=False)
    finally:
        torch.set_num_threads(threads)
    data = base / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(10, seed=0)))
    return base / "pre", data


# seq_len 96 holds no whole dialogue, so these runs train on pieces.
ARGS = {"seq_len": 96, "batch_size": 4, "grad_accum": 1, "sft_val_dialogues": 2, "num_threads": 1, "peak_flops": 1e10}
ARGS["sft_long_dialogues"] = "split"


def losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl", "train")]


@pytest.mark.slow
def test_finetune_starts_from_the_checkpoint_and_writes_loadable_checkpoints(source, tmp_path):
    pre, data = source
    result = finetune(pre, data, tmp_path / "ft", steps=4, progress=False, **ARGS)
    first_eval = read_metrics(tmp_path / "ft" / "metrics.jsonl", "eval")[0]
    source_eval = read_metrics(pre / "metrics.jsonl", "eval")[-1]
    assert first_eval["step"] == 0 and first_eval["val_loss"] == source_eval["val_loss"]  # the source's weights
    sft_rows = result.rows("eval_sft")
    assert [r["step"] for r in sft_rows] == [0, 2, 4]
    assert sft_rows[-1]["sft_val_loss"] < sft_rows[0]["sft_val_loss"]
    assert sft_rows[-1]["pretrain_rows"] == 4 and sft_rows[-1]["sft_rows"] == 12  # 1 in 4 of 16 rows
    model, tokenizer, meta = checkpoint.load(result.checkpoint)
    _, source_tok, _ = checkpoint.load(pre)
    assert meta["step"] == 4 and tokenizer.to_str() == source_tok.to_str()
    assert (tmp_path / "ft" / "sft_data.jsonl").read_text() == data.read_text()


@pytest.mark.slow
def test_finetune_resumes_bit_for_bit_and_refuses_other_data(source, tmp_path):
    pre, data = source
    finetune(pre, data, tmp_path / "full", steps=4, progress=False, **ARGS)
    finetune(pre, data, tmp_path / "cut", steps=4, progress=False, stop_after=2, **ARGS)
    result = finetune(pre, data, tmp_path / "cut", steps=4, resume=True, progress=False, **ARGS)
    assert result.resumed_from == 2
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    with pytest.raises(ValueError, match="was fine-tuned on other dialogues"):
        prepare(pre, records[:-1], tmp_path / "cut", steps=4, **ARGS)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    rc = main(["sft", "--init-from", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("longcat-lab sft: error:")


@pytest.mark.slow
def test_dialogues_longer_than_the_context_are_left_out(source, tmp_path):
    """By default a dialogue that does not fit the context is not trained on (a piece without its start would teach
    replies whose sources it cannot see); the context may exceed the source model's."""
    from longcat_lab.data.sft import encode_dialogue, load_records

    pre, data = source
    _, tokenizer, _ = checkpoint.load(pre)
    lengths = sorted(len(encode_dialogue(r, tokenizer).ids) for r in load_records(data))
    seq_len = lengths[6] - 1  # the 7 shortest dialogues fit, 3 do not
    assert seq_len > presets.tiny().max_position_embeddings
    args = {**ARGS, "seq_len": seq_len, "sft_long_dialogues": "drop", "batch_size": 2}
    result = finetune(pre, data, tmp_path / "ft", steps=1, progress=False, **args)
    counts = result.rows("eval_sft")[-1]
    assert (counts["dialogues_kept"], counts["dialogues_too_long"]) == (7, 3)
    model, _, _ = checkpoint.load(result.checkpoint)
    assert model.config.max_position_embeddings == seq_len
    recipe = sft_recipe(result.checkpoint)  # what the agentic evaluation records beside its pass^k
    assert (recipe["steps"], recipe["seq_len"], recipe["rows_per_step"]) == (1, seq_len, 2)
    assert (recipe["dialogues_kept"], recipe["dialogues_too_long"], recipe["sft_long_dialogues"]) == (7, 3, "drop")
    assert recipe["forgetting"] and all(len(pair) == 2 for pair in recipe["forgetting"].values())
    assert sft_recipe(pre / "checkpoints" / "step_000004") is None  # pre-training is not a fine-tuning recipe
    with pytest.raises(ValueError, match=r"2 of its 10 dialogues fit the .*-token context, and 2 are held out"):
        finetune(pre, data, tmp_path / "few", steps=1, progress=False, **{**args, "seq_len": lengths[1] - 1})
    assert not (tmp_path / "few").exists()  # a refused run leaves nothing behind


def test_wall_minutes_adds_up_each_process_of_a_resumed_run():
    rows = [{"time_s": t} for t in (10.0, 70.0, 5.0, 65.0, 125.0)]  # 70 s, then a resume that ran 125 s
    assert wall_minutes(rows) == (70 + 125) / 60
    assert wall_minutes([]) == 0
