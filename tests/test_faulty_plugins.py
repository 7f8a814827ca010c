"""A third-party package with one faulty component of every kind (tests/faulty_plugins), pip-installed:
each fault ends in one line naming the distribution, before any training; everything else keeps working."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import NO_UNET, TINY_UNET, small_run

import ddpmkit
from ddpmkit.cli import cli

# pip-installs into the shared environment: run apart from the parallel workers (README's test command)
pytestmark = pytest.mark.installs

PACKAGE = Path(__file__).resolve().parent / "faulty_plugins"
DIST = "ddpmkit-faulty"
PRED = TINY_UNET
RUN = small_run({**NO_UNET, "dataset.limit": None, "dataset.resolution": None, "schedule.timesteps": 10},
                batch_size=8, max_steps=2, samples=2)
DATA = ["--set", "dataset.limit=32", "--set", "dataset.resolution=16"]
NET = [*PRED, *RUN]
TINY = [*NET, *DATA]


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed():
    r = pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(PACKAGE))
    assert r.returncode == 0, r.stderr
    yield
    pip("uninstall", "-y", "-q", DIST)
    sys.modules.pop("ddpmkit_faulty", None)


def invoke(*args):
    ddpmkit.reset_manager()
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "250"})


def error_line(result) -> str:
    """The one error line: the last line of stderr; every other line is a plugin warning."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert all(line.startswith("Warning: ") for line in lines[:-1]), result.stderr
    return lines[-1]


def test_plugins_command_lists_the_faulty_plugin_as_failed(installed):
    r = invoke("plugins", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    faulty = rows["faulty"]
    assert faulty["distribution"] == DIST and faulty["version"] == "0.0.1"
    assert "schedule 'linear' is registered by two plugins: 'linear' and 'faulty'" in faulty["error"]
    assert "'PlainConfig' of schedule 'plain-config' is neither an attrs class nor a dataclass" in faulty["error"]
    assert "linear" not in faulty["components"]["schedule"] and "dc-const" in faulty["components"]["schedule"]
    # each drop is one warning naming the distribution to uninstall
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 2 and all(f"distribution '{DIST}'; pip uninstall {DIST}" in w for w in warnings)
    assert rows["linear"]["error"] is None
    r = invoke("plugins")
    assert r.exit_code == 0 and "failed" in r.stdout and DIST in r.stdout and "constant β with a dataclass" in r.stdout


def test_everything_else_keeps_working(installed, tmp_path):
    """The built-in keeps 'linear'; a dataclass config works, with its validator; a dataset without a
    data_root option is not handed --data-root (a warning says so)."""
    r = invoke("run", *TINY, "--out", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["components"]["schedule"]["plugin"] == "linear"
    r = invoke("run", *NET, "--schedule", "dc-const", "--set", "schedule.beta=0.02", "--dataset", "shapes",
               "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output
    assert "Warning: dataset 'shapes' has no data_root option; --data-root is ignored" in r.stderr
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["components"]
    assert cfg["schedule"]["options"] == {"timesteps": 10, "beta": 0.02} and cfg["dataset"]["name"] == "shapes"
    r = invoke("run", *NET, "--schedule", "dc-const", "--set", "schedule.beta=2", "--dataset", "shapes",
               "--out", str(tmp_path / "c"))
    assert r.exit_code == 2 and "beta must lie in (0, 1), got 2.0" in error_line(r)


LABEL = "(plugin 'faulty', distribution 'ddpmkit-faulty')"


@pytest.mark.parametrize("args,expected", [
    (["--predictor", "float64-net", *RUN, *DATA],
     f"predictor 'float64-net' {LABEL} returned a float64 tensor of shape (2, 1, 16, 16)"),
    (["--dataset", "hw-images", *NET], f"dataset 'hw-images' {LABEL} returned item 0 as a float32 tensor of shape (16, 16)"),
    (["--dataset", "uint8-images", *NET], f"dataset 'uint8-images' {LABEL} returned item 0 as a uint8 tensor"),
    (["--dataset", "byte-range-images", *NET], f"dataset 'byte-range-images' {LABEL} returned item 0 as a float32 tensor "
                                         "of shape (1, 16, 16) in [0, 255]; expected a float32 (C, H, W) tensor in [-1, 1]"),
    (["--loss", "per-sample-loss", *TINY], f"loss 'per-sample-loss' {LABEL} returned a float32 tensor of shape (2,)"),
    (["--metric", "tensor-metric", *TINY], f"metric 'tensor-metric' {LABEL} returned {{'mean': a float32 tensor of shape ()"),
    (["--sampler", "half-sampler", *TINY], f"sampler 'half-sampler' {LABEL} returned a float32 tensor of shape (1, 1, 8, 8)"),
    (["--timestep-sampler", "one-based", *TINY], f"timestep_sampler 'one-based' {LABEL} returned t as a int64 tensor"),
    (["--logger", "print-only", *TINY], f"logger 'print-only' {LABEL} returned builtin_function_or_method"),
])
def test_each_fault_is_one_line_before_training(installed, tmp_path, args, expected):
    out = tmp_path / "run"
    r = invoke("run", *args, "--out", str(out))
    assert r.exit_code == 2, r.output
    line = error_line(r)
    assert line.startswith(f"Error: {expected}"), line
    assert "; expected " in line
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing written, no training done


def test_faulty_predictor_fails_the_testing_kit_too(installed):
    """ddpmkit.testing and the run-time probe share their checks (and their message)."""
    from ddpmkit.sdk import testing as plugin_testing

    ddpmkit.reset_manager()
    with pytest.raises(AssertionError, match=r"predictor 'float64-net' .* returned a float64 tensor"):
        plugin_testing.check_predictor("float64-net")
