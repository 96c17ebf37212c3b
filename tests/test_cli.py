"""Tests of the `longcat-lab` command line: `train` (a few tiny steps, the report it prints, --resume on a finished
or damaged run, --set errors) and `sample`, through `longcat_lab.cli.main` in-process; and that the `notebooks`
subcommand still answers. Bad input exits with status 2 and a one-line message.

Run: `bash tools/test.sh tests/test_cli.py`.
"""

import pytest

from longcat_lab.cli import main


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
    assert "model.safetensors: truncated" in one_line_error(capsys)


def test_sample(trained, capsys):
    assert main(["sample", "--ckpt", str(trained), "--prompt", "To be, or not", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("To be, or not")
    assert main(["sample", "--ckpt", str(trained / "missing"), "--prompt", "x"]) == 2
    assert "neither a checkpoint folder nor a run folder" in one_line_error(capsys)
    assert main(["sample", "--ckpt", str(trained), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature=-1.0 is not allowed" in one_line_error(capsys)


def test_notebooks_subcommand_still_answers():
    with pytest.raises(SystemExit, match="no notebooks found"):
        main(["notebooks", "--only", "zz_no_such_notebook"])
