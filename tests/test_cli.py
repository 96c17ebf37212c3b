"""Tests of the `longcat-lab` command line: `train` (a few tiny steps, the report it prints, --resume on a finished
or damaged run, --set errors) and `sample`, through `longcat_lab.cli.main` in-process; and that the `notebooks`
subcommand still answers. Bad input exits with status 2 and a one-line message.

Run: `bash tools/test.sh tests/test_cli.py`.
"""

import io

import pytest

from longcat_lab.cli import chat, main, parser


@pytest.fixture(scope="module")
def base_args(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "longcat_lab_cache"
    return [
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--no-progress",
        "--set",
        f"cache_dir={cache}",
        "--set",
        "max_bytes_per_domain=150000",
        "--set",
        "tokenizer_sample_bytes=60000",
        "--set",
        "num_threads=1",
        "--set",
        "peak_flops=1e10",
        "--set",
        "batch_size=4",
    ]


@pytest.fixture(scope="module")
def trained(base_args, tmp_path_factory):
    """A finished 4-step run (module scope: several tests read it)."""
    out = tmp_path_factory.mktemp("cli_run")
    assert main(["train", "--out", str(out), *base_args, "--samples", "6"]) == 0
    return out


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err, err
    return err


def test_train_prints_validation_loss_and_samples(base_args, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), *base_args, "--samples", "6"]) == 0
    out = capsys.readouterr().out
    assert "validation loss per domain" in out
    for domain in ("shakespeare", "python", "reasoning"):
        assert f"  {domain}" in out and f"--- {domain}" in out
    assert (tmp_path / "checkpoints" / "step_000004" / "meta.json").is_file()


def test_rerun_with_resume_is_a_no_op_and_without_it_an_error(trained, base_args, capsys):
    assert main(["train", "--out", str(trained), *base_args, "--samples", "0", "--resume"]) == 0
    assert "had already reached step 4: nothing to train" in capsys.readouterr().out
    assert main(["train", "--out", str(trained), *base_args, "--samples", "0"]) == 2
    assert "already holds checkpoints" in one_line_error(capsys)


@pytest.mark.parametrize(
    "setting,words",
    [
        ("bogus=1", "unknown field 'bogus'"),
        ("batch_size=x", "batch_size='x' is not allowed"),
        ("bias_controller=magic", "bias_controller='magic' is not allowed"),
    ],
)
def test_bad_set_is_one_line(base_args, tmp_path, capsys, setting, words):
    assert main(["train", "--out", str(tmp_path), *base_args, "--set", setting]) == 2
    assert words in one_line_error(capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_from_damaged_checkpoint_names_the_file(base_args, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), *base_args, "--samples", "0", "--steps", "2"]) == 0
    weights = tmp_path / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert main(["train", "--out", str(tmp_path), *base_args, "--samples", "0", "--steps", "2", "--resume"]) == 2
    assert "none of its checkpoints verifies" in one_line_error(capsys)


def test_sample(trained, capsys):
    assert main(["sample", "--ckpt", str(trained), "--prompt", "To be, or not", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("To be, or not")
    assert main(["sample", "--ckpt", str(trained / "missing"), "--prompt", "x"]) == 2
    assert "neither a checkpoint folder nor a run folder" in one_line_error(capsys)
    assert main(["sample", "--ckpt", str(trained), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature=-1.0 is not allowed" in one_line_error(capsys)


def test_sample_speculative_and_int8(trained, base_args, tmp_path, capsys):
    """`sample --speculative` writes plain greedy's text (and says how many drafts were accepted); a checkpoint
    without the MTP module is refused in one line; `--quantize int8` samples from the quantised copy."""
    out = tmp_path / "mtp"
    args = [a for a in base_args if a != "--steps" and a != "4"]
    assert main(["train", "--out", str(out), *args, "--steps", "2", "--samples", "0", "--eval", "none",
                 "--set", "num_nextn_predict_layers=1"]) == 0  # fmt: skip
    capsys.readouterr()
    greedy = ["sample", "--ckpt", str(out), "--prompt", "To be", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--speculative"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "drafts accepted" in captured.err
    assert main(["sample", "--ckpt", str(trained), "--prompt", "x", "--speculative"]) == 2
    assert "has no MTP module" in one_line_error(capsys)
    assert main([*greedy, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("To be")


def test_notebooks_subcommand_still_answers():
    with pytest.raises(SystemExit, match="no notebooks found"):
        main(["notebooks", "--only", "zz_no_such_notebook"])


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--samples", "-1"], "--samples=-1 is not allowed"),
        (["--samples", "600"], "--samples=600 is not allowed: it must be below max_position_embeddings=512"),
        (["--seed", str(2**63)], "--seed=9223372036854775808 is not allowed"),
        (["--set", "num_threads=100000"], "num_threads=100000 is not allowed"),
        (["--set", "device=cuda:99"], "device='cuda:99' is not allowed"),
        (["--steps", "0"], "--steps=0 is not allowed"),
    ],
)
def test_bad_arguments_fail_before_any_work(base_args, tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *base_args, *extra]) == 2
    assert words in one_line_error(capsys)
    assert not out.exists(), "nothing is written before the arguments are checked"


def test_bad_out_is_one_line(base_args, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out, words in (
        ("", "--out='' is not allowed"),
        ("  ", "--out='  ' is not allowed"),
        (str(a_file), "it is a file; choose a folder"),
        (str(a_file / "sub"), "is a file, so no folder can be made under it"),
    ):
        assert main(["train", "--out", out, *base_args]) == 2
        assert words in one_line_error(capsys)
    assert a_file.read_text() == "keep me"
    monkeypatch.chdir(tmp_path)  # an empty --out must never mean the current folder
    assert main(["train", "--out", "", *base_args]) == 2 and not (tmp_path / "metrics.jsonl").exists()
    capsys.readouterr()


def test_os_errors_are_one_line_naming_the_path(base_args, tmp_path, capsys, monkeypatch):
    import errno

    import longcat_lab.train.lock as lock

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / ".writer.lock"))

    monkeypatch.setattr(lock.RunLock, "acquire", refuse)  # as where the folder turns read-only after the checks
    assert main(["train", "--out", str(tmp_path / "run"), *base_args, "--samples", "0"]) == 2
    err = one_line_error(capsys)
    assert ".writer.lock: Permission denied; choose a --out you may write to" in err


def test_sample_edge_values(trained, capsys):
    assert main(["sample", "--ckpt", str(trained), "--prompt", "def f(", "--max-new-tokens", "511"]) == 2
    err = one_line_error(capsys)
    assert "the prompt is" in err and "max_new_tokens=511" in err and "max_position_embeddings=512" in err
    for extra in (["--temperature", "1e-40"], ["--top-p", "1e-300"]):
        assert main(["sample", "--ckpt", str(trained), "--prompt", "To be", "--max-new-tokens", "3", *extra]) == 0
        assert capsys.readouterr().out.startswith("To be")
    assert main(["sample", "--ckpt", str(trained), "--prompt", "x", "--seed", str(2**63)]) == 2
    assert "--seed=9223372036854775808 is not allowed" in one_line_error(capsys)
    assert main(["sample", "--ckpt", str(trained), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p=0.0 is not allowed" in one_line_error(capsys)


# Hostile probes (docs/design.md §9): each ends in a result or one line, with nothing lost or left behind.
@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "d.jsonl"
    assert main(["synth", "--n", "6", "--out", str(path), "--no-progress"]) == 0
    return path


def test_synth_refuses_a_device_node_and_a_folder_before_the_work(tmp_path, capsys):
    # Through a link, so that a writer without the check replaces the link, never /dev/null itself.
    link = tmp_path / "null.jsonl"
    link.symlink_to("/dev/null")
    assert main(["synth", "--n", "2", "--out", str(link), "--no-progress"]) == 2
    assert f"--out='{link}' is not allowed: it is a device node" in one_line_error(capsys)
    assert link.is_symlink()
    assert main(["synth", "--n", "2", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "it is a folder" in one_line_error(capsys)
    (tmp_path / "file").write_text("")
    assert main(["synth", "--n", "2", "--out", str(tmp_path / "file" / "d.jsonl"), "--no-progress"]) == 2
    assert "is not a folder this user may write to" in one_line_error(capsys)


def test_synth_bounds_n(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    assert main(["synth", "--n", "1000000000", "--out", str(out), "--no-progress"]) == 2
    assert "--n=1000000000 is not allowed: it must be from 1 to 20,000" in one_line_error(capsys)
    assert main(["synth", "--n", "0", "--out", str(out), "--no-progress"]) == 2
    assert "--n=0" in one_line_error(capsys)
    assert not out.exists()


def test_sft_into_its_own_source_is_refused_and_writes_nothing(trained, dialogues, capsys):
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    for out in (trained, trained / "ft"):
        assert main(["sft", "--init-from", str(trained), "--data", str(dialogues), "--out", str(out)]) == 2
        assert "must lie apart from the source run" in one_line_error(capsys)
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before


def test_a_refused_sft_run_leaves_nothing_behind(trained, dialogues, tmp_path, capsys):
    out = tmp_path / "ft"
    args = [
        "sft",
        "--init-from",
        str(trained),
        "--data",
        str(dialogues),
        "--out",
        str(out),
        "--set",
        "sft_val_dialogues=2",
    ]
    assert main([*args, "--set", "num_threads=1000000"]) == 2
    assert "num_threads=1000000 is not allowed" in one_line_error(capsys)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--set", "num_threads=1000000"]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--arithmetic", "-1"], "--arithmetic=-1 is not allowed"),
        (["--code", "0"], "--code=0 is not allowed"),
    ],
)
def test_eval_names_its_flags(trained, capsys, extra, words):
    assert main(["eval", "--ckpt", str(trained), "--no-write", *extra]) == 2
    assert words in one_line_error(capsys)


def test_sample_prompt_that_is_not_utf8_is_one_line(trained, capsys):
    prompt = b"caf\xff".decode("utf-8", "surrogateescape")  # what Python makes of such a byte on a command line
    assert main(["sample", "--ckpt", str(trained), "--prompt", prompt]) == 2
    assert "--prompt is not allowed: byte 0xff at character 3 is not UTF-8" in one_line_error(capsys)


def test_chat_window_beyond_the_model_is_refused_up_front(trained, capsys):
    assert main(["chat", "--ckpt", str(trained), "--window", "3000"]) == 2
    assert "--window=3000 is not allowed: it must be from 2 to the model's max_position_embeddings=" in (
        one_line_error(capsys)
    )


def test_chat_goes_on_after_a_line_that_is_not_utf8(trained):
    args = parser().parse_args(["chat", "--ckpt", str(trained), "--max-new-tokens", "2"])
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\nhi\n"), encoding="utf-8")
    out = io.StringIO()
    chat.run(args, stdin, out)
    text = out.getvalue()
    assert text.count("byte 0xff at character 0 is not UTF-8") == 1
    assert text.count("model> ") == 1  # the good line after it is answered
