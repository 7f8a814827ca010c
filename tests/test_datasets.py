"""Dataset plugins on real data (../shared/data, Debian's Fashion-MNIST) and on trees the tests build."""

import gzip
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import small_run
from PIL import Image

import ddpmkit
from ddpmkit.cli import cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR, CIFAR_DIR = SHARED / "mnist", SHARED / "cifar10-test"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_DATA", str(tmp_path / "cache"))


def _read_idx_images(path):
    raw = gzip.open(path).read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="../shared/data/mnist not present")
def test_mnist_reads_real_gz_idx_files():
    ds = ddpmkit.build("dataset", "mnist", {"data_root": str(MNIST_DIR), "split": "test", "download": False})
    assert len(ds) == 10000 and ds.channels == 1 and ds.resolution == 32
    raw = _read_idx_images(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    x, y = ds[123]
    torch.testing.assert_close(x[0, 2:30, 2:30], torch.from_numpy(raw[123].astype(np.float32)) / 127.5 - 1)
    assert torch.all(x[0, :2] == -1) and x.min() >= -1 and x.max() <= 1
    labels = np.frombuffer(gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    assert int(y) == labels[123]
    sub = ddpmkit.build("dataset", "mnist", {"data_root": str(MNIST_DIR), "split": "test", "download": False,
                                             "classes": "3,seven", "limit": 500, "resolution": 16})
    assert len(sub) == 500 and set(sub.labels.tolist()) == {3, 7} and sub[0][0].shape == (1, 16, 16)


def test_mnist_missing_offline_names_files(tmp_path):
    with pytest.raises(ddpmkit.DdpmkitError, match=r"put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz in .*MNIST/raw"):
        ddpmkit.build("dataset", "mnist", {"data_root": str(tmp_path / "none"), "download": False})


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    ds = ddpmkit.build("dataset", "fashion-mnist", {"data_root": str(tmp_path / "empty"), "download": False,
                                                     "classes": "Trouser"})
    assert len(ds) == 6000 and set(ds.labels.tolist()) == {1}


def test_aircraft_crops_banner_and_resizes(aircraft_tree):
    ds = ddpmkit.build("dataset", "aircraft", {"data_root": str(aircraft_tree), "resolution": 16, "download": False})
    assert len(ds) == 12 and ds.channels == 3  # split "all" = trainval + test
    x, y = ds[0]
    assert x.shape == (3, 16, 16)
    assert x[1:].max() < -0.5  # green/blue stay dark: no white banner survived the crop
    assert x[0].min() > 0.4    # red everywhere
    train = ddpmkit.build("dataset", "aircraft", {"data_root": str(aircraft_tree), "split": "train",
                                                  "download": False, "classes": "A300B4"})
    assert len(train) == 2 and set(train.labels) == {1}
    with pytest.raises(ddpmkit.DdpmkitError, match="class 'F-16' is not a class of aircraft at .*; classes: 707-320"):
        ddpmkit.build("dataset", "aircraft", {"data_root": str(aircraft_tree), "classes": "F-16", "download": False})


def test_aircraft_wrong_layout_and_missing(aircraft_tree, tmp_path):
    with pytest.raises(ddpmkit.DdpmkitError, match="FGVC-Aircraft not found under .*fgvc-aircraft-2013b/data/"):
        ddpmkit.build("dataset", "aircraft", {"data_root": str(tmp_path / "nothing"), "download": False})
    for f in (aircraft_tree / "fgvc-aircraft-2013b" / "data" / "images").glob("*.jpg"):
        f.unlink()
    with pytest.raises(ddpmkit.DdpmkitError, match="which is not there: wrong layout"):
        ddpmkit.build("dataset", "aircraft", {"data_root": str(aircraft_tree), "download": False})


@pytest.mark.skipif(not CIFAR_DIR.is_dir(), reason="../shared/data/cifar10-test not present")
def test_cifar10_class_folders_real_images():
    ds = ddpmkit.build("dataset", "cifar10", {"data_root": str(CIFAR_DIR), "classes": "ship,truck", "download": False})
    assert len(ds) == 2000 and ds.channels == 3 and ds.resolution == 32
    x, y = ds[0]
    ref = np.asarray(Image.open(ds.files[0]).convert("RGB"), dtype=np.float32)
    torch.testing.assert_close(x, torch.from_numpy(ref).permute(2, 0, 1) / 127.5 - 1)
    assert ds.classes[int(y)] in ("ship", "truck")


def test_cifar10_pickles(tmp_path, monkeypatch):
    import torchvision.datasets
    import torchvision.datasets.cifar

    # the files are ours, not the real release, so skip torchvision's md5 checks
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(range(4))}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                                                                     "dog", "frog", "horse", "ship", "truck"]}))
    ds = ddpmkit.build("dataset", "cifar10", {"data_root": str(tmp_path), "download": False})
    assert len(ds) == 20 and ds.images.shape == (20, 3, 32, 32)
    first = pickle.loads((base / "data_batch_1").read_bytes())["data"][0].reshape(3, 32, 32)
    torch.testing.assert_close(ds[0][0], torch.from_numpy(first.astype(np.float32)) / 127.5 - 1)
    with pytest.raises(ddpmkit.DdpmkitError, match="CIFAR-10 not found under"):
        ddpmkit.build("dataset", "cifar10", {"data_root": str(tmp_path / "x"), "download": False})


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(root / "cats" / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(root / "cats" / "deep" / "b.png")
    Image.fromarray(rng.integers(0, 255, (64, 48), dtype=np.uint8), "L").save(root / "dogs" / "c.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / "dogs" / "d.webp")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).convert("P").save(root / "e.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_any_size_and_mode(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ddpmkit.build("dataset", "image-folder", {"path": str(folder), "resolution": 16})
        items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 5 and ds.classes == ["cats", "dogs"]
    assert all(x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 for x, _ in items)
    gray_notes = [w for w in caught if "converted to RGB" in str(w.message)]
    assert len(gray_notes) == 1  # said once, although two images are grayscale-like
    one = ddpmkit.build("dataset", "image-folder", {"path": str(folder), "channels": 1, "resolution": 8,
                                                    "classes": "dogs"})
    assert len(one) == 2 and one[0][0].shape == (1, 8, 8)


def test_image_folder_resize_center_crop_matches_torchvision(folder):
    from torchvision.transforms import v2

    ds = ddpmkit.build("dataset", "image-folder", {"path": str(folder), "resolution": 20})
    path = next(i for i, f in enumerate(ds.files) if f.endswith("a.png"))
    ref = v2.Compose([v2.PILToTensor(), v2.Resize(20, antialias=True), v2.CenterCrop(20)])(
        Image.open(ds.files[path]).convert("RGB")).float() / 127.5 - 1
    assert (ds[path][0] - ref).abs().max() < 2 / 127.5  # same up to rounding to uint8


def test_image_folder_bad_files(folder):
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(good, "JPEG")
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.warns(UserWarning) as caught:
        ds = ddpmkit.build("dataset", "image-folder", {"path": str(folder), "max_bad_fraction": 0.5})
    messages = [str(w.message) for w in caught]
    assert any("broken.jpg" in m for m in messages) and any("truncated.jpg" in m for m in messages)
    assert any("skipped 2 unreadable image(s) of 7" in m for m in messages)
    assert len(ds) == 5
    with pytest.raises(ddpmkit.DdpmkitError, match=r"2 of 7 images are unreadable \(29% > max_bad_fraction 1%\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ddpmkit.build("dataset", "image-folder", {"path": str(folder)})


def test_image_folder_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ddpmkit.DdpmkitError, match="no PNG/JPEG/WebP images under '.*empty'"):
        ddpmkit.build("dataset", "image-folder", {"path": str(tmp_path / "empty")})
    with pytest.raises(ddpmkit.DdpmkitError, match="'.*nope' is not a folder"):
        ddpmkit.build("dataset", "image-folder", {"path": str(tmp_path / "nope")})
    with pytest.raises(ddpmkit.DdpmkitError, match="needs a folder"):
        ddpmkit.build("dataset", "image-folder")


def test_hflip_is_random_per_item_and_seeded():
    ds = ddpmkit.build("dataset", "mnist-5k", {"hflip": True, "limit": 64})
    plain = ddpmkit.build("dataset", "mnist-5k", {"limit": 64})
    torch.manual_seed(0)
    a = torch.stack([ds[i][0] for i in range(64)])
    torch.manual_seed(0)
    b = torch.stack([ds[i][0] for i in range(64)])
    assert torch.equal(a, b)
    flipped = [bool(torch.equal(a[i], plain.images[i].flip(-1))) and not torch.equal(a[i], plain.images[i]) for i in range(64)]
    assert 10 < sum(flipped) < 54
    batch = ds.__getitems__(list(range(64)))
    assert len(batch) == 64 and batch[0][0].shape == (1, 32, 32)


def test_run_on_image_folder_with_workers(folder, tmp_path, tiny_args):
    result = CliRunner().invoke(cli, ["run", "--dataset", "image-folder", "--set", f"dataset.path={folder}",
                                      "--out", str(tmp_path / "run"), *tiny_args, "--batch-size", "2",
                                      "--workers", "2"])
    assert result.exit_code == 0, result.output
    cfg = (tmp_path / "run" / "config.json").read_text()
    assert '"channels": 3' in cfg


def _tiny_preset_args(tmp_path):
    return small_run({"preset": None, "dataset.limit": None, "dataset.resolution": None, "schedule.timesteps": 5,
                      "predictor.layers_per_block": None, "predictor.attention_resolutions": 16},
                     batch_size=None, max_steps=1, samples=1, out=tmp_path / "run")


def test_preset_aircraft_runs_on_the_tree(aircraft_tree, tmp_path):
    import json

    result = CliRunner().invoke(cli, ["run", "--preset", "aircraft", "--data-root", str(aircraft_tree),
                                      "--batch-size", "4", "--workers", "0", *_tiny_preset_args(tmp_path)])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"] == {"channels": 3, "resolution": 64}
    assert cfg["components"]["loss"]["name"] == "smoothl1" and cfg["run"]["lr"] == 2e-4 and cfg["run"]["epochs"] == 20
    assert cfg["components"]["predictor"]["options"]["dropout"] == 0.01


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="../shared/data/mnist not present")
def test_preset_mnist_runs_on_real_mnist(tmp_path):
    import json

    result = CliRunner().invoke(cli, ["run", "--preset", "mnist", "--data-root", str(MNIST_DIR),
                                      "--set", "dataset.split=test", *_tiny_preset_args(tmp_path)])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"] == {"channels": 1, "resolution": 32} and cfg["run"]["batch_size"] == 32
    assert cfg["run"]["epochs"] == 15 and cfg["components"]["schedule"]["options"]["beta_end"] == 0.02


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="../shared/data/mnist not present")
def test_mnist_reads_uncompressed_idx_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / stem).write_bytes(gzip.open(MNIST_DIR / f"{stem}.gz").read())
    ds = ddpmkit.build("dataset", "mnist", {"data_root": str(tmp_path), "split": "test", "download": False,
                                            "limit": 100})
    assert len(ds) == 100
    ref = ddpmkit.build("dataset", "mnist", {"data_root": str(MNIST_DIR), "split": "test", "download": False,
                                             "limit": 100})
    assert torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels)
