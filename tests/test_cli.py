"""The command line: one-line errors with exit code 2, --help everywhere, checkpoints that fail cleanly."""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ddpmkit.cli import cli


def invoke(args):
    return CliRunner().invoke(cli, args)


def assert_one_line_error(result, *fragments, code=2):
    assert result.exit_code == code, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args", [[], ["run"], ["sample"], ["plugins"]])
def test_help_everywhere(args):
    result = invoke(args + ["--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_unknown_names(tmp_path):
    out = str(tmp_path / "r")
    assert_one_line_error(invoke(["run", "--schedule", "linaer", "--out", out]),
                          "unknown schedule 'linaer'; did you mean 'linear'? available: cosine, linear, quadratic, sigmoid")
    assert_one_line_error(invoke(["run", "--loss", "smoothl2", "--out", out]), "did you mean 'smoothl1'")
    assert_one_line_error(invoke(["run", "--dataset", "nope", "--out", out]), "unknown dataset 'nope'")
    assert_one_line_error(invoke(["run", "--predictor", "unet3d", "--out", out]), "did you mean 'unet2d'")
    assert_one_line_error(invoke(["run", "--preset", "mnsit", "--out", out]), "did you mean 'mnist'")
    assert not (tmp_path / "r").exists()  # nothing written for bad input


@pytest.mark.parametrize("args,fragment", [
    (["--set", "schedule.timesteps=0"], "timesteps"),
    (["--set", "schedule.beta_end=1.5"], "beta_end must lie in (0, 1)"),
    (["--set", "schedule.beta_start=-0.1"], "beta_start must lie in (0, 1)"),
    (["--set", "schedule.beta_start=0.05"], "must not exceed beta_end"),
    (["--set", "schedule.bogus=1"], "unknown option 'bogus'"),
    (["--set", "nokind.x=1"], "unknown kind 'nokind'"),
    (["--set", "timesteps"], "--set expects KIND.OPTION=VALUE"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--lr", "-1"], "lr must be > 0"),
])
def test_invalid_values(tmp_path, args, fragment):
    assert_one_line_error(invoke(["run", "--out", str(tmp_path / "r"), "--no-progress", *args]), fragment)


def test_batch_larger_than_dataset(tmp_path, tiny_args):
    result = invoke(["run", "--out", str(tmp_path / "r"), *tiny_args, "--set", "dataset.limit=10", "--batch-size", "32"])
    assert_one_line_error(result, "batch size 32 is larger than dataset 'mnist-5k' (10 images)")


def test_presets_without_their_data_say_so(tmp_path):
    assert_one_line_error(invoke(["run", "--preset", "mnist", "--data-root", str(tmp_path / "d"),
                                  "--set", "dataset.download=false", "--out", str(tmp_path / "r")]),
                          "mnist train files not found", "train-images-idx3-ubyte.gz")
    assert_one_line_error(invoke(["run", "--preset", "aircraft", "--data-root", str(tmp_path / "d"),
                                  "--set", "dataset.download=false", "--out", str(tmp_path / "r")]),
                          "FGVC-Aircraft not found under")


def test_bad_checkpoints(tmp_path, tiny_args):
    assert_one_line_error(invoke(["sample", str(tmp_path / "missing.safetensors")]), "no checkpoint at")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint at all")
    assert_one_line_error(invoke(["sample", str(garbage), "--out", str(tmp_path / "g.png")]), "cannot read checkpoint")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert_one_line_error(invoke(["sample", str(foreign)]), "not a ddpmkit checkpoint")

    run = tmp_path / "run"
    assert invoke(["run", "--out", str(run), *tiny_args]).exit_code == 0
    ckpt = run / "model.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_one_line_error(invoke(["sample", str(truncated), "--out", str(tmp_path / "t.png")]), "cannot read checkpoint")
    # mismatched: weights of one shape, config of another
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    key = next(k for k in tensors if k.endswith("conv_in.weight"))
    tensors[key] = torch.zeros(3, 3)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(mismatched), metadata=meta)
    assert_one_line_error(invoke(["sample", str(mismatched), "--out", str(tmp_path / "m.png")]),
                          "does not match its predictor 'unet2d'")
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "m.png").exists()


def test_debug_shows_traceback(tmp_path):
    result = invoke(["--debug", "run", "--schedule", "linaer", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and result.exception is not None


def test_console_script_exit_code(tmp_path):
    """The installed entry point, in a real process: one line on stderr, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "ddpmkit", "run", "--schedule", "linaer"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: unknown schedule 'linaer'; did you mean 'linear'? available: cosine, linear, quadratic, sigmoid"
