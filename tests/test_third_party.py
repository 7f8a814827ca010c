"""A real third-party package (examples/ddpmkit-geometric): pip install → listed and usable → uninstall → gone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_run

# pip-installs into the shared environment: run apart from the parallel workers (README's test command)
pytestmark = pytest.mark.installs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddpmkit-geometric"


def ddpmkit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ddpmkit", *args], capture_output=True, text=True, cwd=cwd)


def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


@pytest.fixture
def installed():
    r = pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    yield
    pip("uninstall", "-y", "-q", "ddpmkit-geometric")


def test_install_use_uninstall(installed, tmp_path):
    listed = json.loads(ddpmkit("plugins", "--json", cwd=tmp_path).stdout)
    row = next(r for r in listed if r["name"] == "geometric")
    assert row["version"] == "0.1.0" and row["components"] == {"schedule": ["geometric"]} and row["error"] is None
    run = ddpmkit("run", "--schedule", "geometric", *small_run(
        {"schedule.timesteps": 10, "dataset.limit": 32, "predictor.layers_per_block": None,
         "predictor.attention_resolutions": None}, batch_size=8, max_steps=2, samples=2, out=tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["components"]["schedule"]["plugin"] == "geometric" and cfg["components"]["schedule"]["version"] == "0.1.0"
    # the plugin's own contract test passes
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # uninstall: gone
    assert pip("uninstall", "-y", "-q", "ddpmkit-geometric").returncode == 0
    listed = json.loads(ddpmkit("plugins", "--json", cwd=tmp_path).stdout)
    assert "geometric" not in {r["name"] for r in listed}
    gone = ddpmkit("run", "--schedule", "geometric", "--out", str(tmp_path / "run2"), cwd=tmp_path)
    assert gone.returncode == 2 and "unknown schedule 'geometric'" in gone.stderr
