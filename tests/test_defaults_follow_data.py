"""`ddpmkit run --dataset NAME` alone trains and samples on every built-in dataset and on third-party
datasets of any square side, with or without labels: the default's stem and conditioning follow the
data, and the run says in one line what it chose. The default MNIST run is unchanged."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import ddpmkit
from ddpmkit.cli import cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# what only sizes the test (steps, batch, grid); nothing about the network or the conditioning
SMALL = ["--max-steps", "2", "--batch-size", "8", "--samples", "4", "--no-progress", "--device", "cpu"]


def run(tmp_path, *args):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *args, *SMALL, "--out", str(out)])
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    return r, cfg, out


def trained(r, out):
    assert r.exit_code == 0, r.output
    assert (out / "samples.png").stat().st_size > 0 and (out / "model.safetensors").exists()


@pytest.fixture
def testdata(monkeypatch):
    """The test plugin package's datasets (tests/data_plugins), registered in-process."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "data_plugins"))
    sys.modules.pop("ddpmkit_testdata", None)
    ddpmkit.register_plugin(importlib.import_module("ddpmkit_testdata"), name="testdata")


def png_folder(root: Path, side: int, mode: str = "RGB", count: int = 12) -> Path:
    rng = np.random.default_rng(side)
    for i in range(count):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        shape = (side, side, 3) if mode == "RGB" else (side, side)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(sub / f"{i}.png")
    return root


# -- built-in datasets ----------------------------------------------------------------------------
def test_cifar10(tmp_path):
    if not (SHARED / "cifar10-test").is_dir():
        pytest.skip("../shared/data/cifar10-test not present")
    r, cfg, out = run(tmp_path, "--dataset", "cifar10", "--data-root", str(SHARED / "cifar10-test"),
                      "--set", "dataset.limit=64", "--workers", "0")
    trained(r, out)
    assert "labels (10 classes: airplane, automobile, bird" in r.stderr
    assert "32×32 images: a 2×2 space-to-depth stem (16×16 inside the U-Net)" in r.stderr
    assert cfg["data"]["num_classes"] == 10 and cfg["data"]["channels"] == 3


def test_mnist_full(tmp_path):
    if not (SHARED / "mnist").is_dir():
        pytest.skip("../shared/data/mnist not present")
    r, cfg, out = run(tmp_path, "--dataset", "mnist", "--data-root", str(SHARED / "mnist"), "--set", "dataset.split=test",
                      "--set", "dataset.limit=64")
    trained(r, out)
    assert "32×32 images: a 2×2 space-to-depth stem" in r.stderr and cfg["data"]["num_classes"] == 10


@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist(tmp_path):
    r, cfg, out = run(tmp_path, "--dataset", "fashion-mnist", "--set", "dataset.limit=64")
    trained(r, out)
    assert cfg["data"]["num_classes"] == 10


def test_aircraft(aircraft_tree, tmp_path):
    r, cfg, out = run(tmp_path, "--dataset", "aircraft", "--data-root", str(aircraft_tree), "--workers", "0")
    trained(r, out)
    assert "64×64 images: a 4×4 space-to-depth stem (16×16 inside the U-Net)" in r.stderr
    assert cfg["data"]["num_classes"] == 3 and "labels (3 classes: 707-320, A300B4, Cessna 172)" in r.stderr


@pytest.mark.parametrize("side", [32, 16])
def test_image_folder(side, tmp_path):
    folder = png_folder(tmp_path / "imgs", side)
    r, cfg, out = run(tmp_path, "--dataset", "image-folder", "--set", f"dataset.path={folder}",
                      "--set", f"dataset.resolution={side}", "--workers", "0")
    trained(r, out)
    assert (f"{side}×{side} images: no stem" if side == 16 else "32×32 images: a 2×2 space-to-depth stem") in r.stderr
    assert cfg["data"]["num_classes"] == 2


def test_mnist_5k_is_the_default_run_itself(tmp_path):
    """Naming the default's own dataset changes nothing: the preset's 28×28 stem and conditioning stay."""
    r, cfg, out = run(tmp_path, "--dataset", "mnist-5k", "--set", "dataset.limit=64")
    trained(r, out)
    assert cfg["run"]["predictor"]["options"]["patch_size"] == 2 and cfg["run"]["class_conditional"] is True
    assert "space-to-depth" not in r.stderr  # nothing was chosen, so nothing is said


# -- third-party datasets --------------------------------------------------------------------------
def test_labelled_24(testdata, tmp_path):
    r, cfg, out = run(tmp_path, "--dataset", "stripes")
    trained(r, out)
    assert "labels (3 classes: vertical, horizontal, diagonal): class-conditional" in r.stderr
    assert "24×24 images: a 2×2 space-to-depth stem, 2 pixels of padding (14×14 inside the U-Net)" not in r.stderr
    assert "24×24 images: a 2×2 space-to-depth stem" in r.stderr
    pipe = ddpmkit.load_checkpoint(out)
    assert pipe.num_classes == 3 and pipe.sample(3, class_labels=["diagonal"] * 3,
                                                 sampler_options={"steps": 2}).shape == (3, 3, 24, 24)


def test_unlabelled_32(testdata, tmp_path):
    r, cfg, out = run(tmp_path, "--dataset", "blobs")
    trained(r, out)
    assert "no labels: unconditional" in r.stderr and "num_classes" not in cfg["data"]
    assert ddpmkit.load_checkpoint(out).num_classes is None


def test_odd_36_with_labels_but_no_class_count(testdata, tmp_path):
    r, cfg, out = run(tmp_path, "--dataset", "odd-36")
    trained(r, out)
    assert "no labels: unconditional" in r.stderr
    assert "36×36 images: a 4×4 space-to-depth stem, 6 pixels of padding (12×12 inside the U-Net)" in r.stderr
    assert cfg["data"] == {"channels": 1, "resolution": 36}


def test_dataset_recommendation_fills_what_is_left_to_choose(testdata, tmp_path):
    r, cfg, out = run(tmp_path, "--dataset", "tiny-20")
    trained(r, out)
    assert "num_classes" not in cfg["data"]  # recommended unconditional although labelled
    assert "20×20 images" not in r.stderr  # the stem was recommended, not chosen
    model = ddpmkit.load_checkpoint(out).model
    assert model.stem == {"patch_size": 1, "pad": 2} and model.unet.config.sample_size == 24


def test_explicit_choices_that_cannot_work_are_one_line(testdata, tmp_path):
    r, _, _ = run(tmp_path, "--dataset", "blobs", "--class-conditional")
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith("Error: dataset 'blobs'")
    assert r.stderr.strip().endswith("which a class-conditional run needs; drop --class-conditional "
                                     "(or pass --unconditional)")
    r, _, _ = run(tmp_path, "--dataset", "odd-36", "--set", "predictor.patch_size=2", "--set", "predictor.pad=0")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "got 18 (36/2 inside the patch_size=2 stem); set predictor.pad=none" in r.stderr
    # an explicit choice that works is kept
    r, cfg, out = run(tmp_path, "--dataset", "stripes", "--unconditional", "--set", "predictor.patch_size=1")
    trained(r, out)
    assert "num_classes" not in cfg["data"] and "no stem" in r.stderr and "conditional" not in r.stderr



def test_fit_stem_table():
    from ddpmkit_plugins.predictors.unet2d import fit_stem

    # side → (patch, pad before, pad after) for the 3-level default network
    expected = {8: (1, 0, 0), 13: (1, 1, 2), 16: (1, 0, 0), 20: (2, 2, 2), 28: (2, 2, 2), 32: (2, 0, 0),
                36: (4, 6, 6), 64: (4, 0, 0)}
    assert {side: fit_stem(side, 3, None, None) for side in expected} == expected
    for side, (p, lo, hi) in expected.items():
        assert (side + lo + hi) % (p * 4) == 0 and (side + lo + hi) // p <= 16
