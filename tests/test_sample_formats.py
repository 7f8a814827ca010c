"""`ddpmkit sample --format grid|png|npz`: the samples as files other tools read, and `evaluate --images`
reading them back to the same values as scoring the samples as drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.assembly import DataShape, build_predictor
from ddpmkit.run.model_file import save_model_file
from ddpmkit.sdk.options import config_to_dict


def random_run(path, channels: int, num_classes: int | None, classes=None):
    """A random-weight 16×16 run directory (model file only), T = 20: as `ddpmkit sample` reads one."""
    config = ddpmkit.preset_config("tiny")
    config.schedule.options["timesteps"] = 20
    config.predictor.options.update(block_out_channels=(16, 32), attention_resolutions=(4,), norm_num_groups=8)
    config.class_conditional = num_classes is not None
    shape = DataShape(channels, 16, num_classes, classes)
    torch.manual_seed(0)
    model, _ = build_predictor(config, shape)
    path.mkdir()
    data = {k: v for k, v in {"channels": channels, "resolution": 16, "num_classes": num_classes,
                              "classes": list(classes) if classes else None}.items() if v is not None}
    save_model_file(path / "model.safetensors", model.state_dict(), {"run": config_to_dict(config), "data": data})
    return path


def invoke(*args):
    r = CliRunner().invoke(cli, [*args, "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return r


def test_png_folder_names_and_pixels(tmp_path):
    run = random_run(tmp_path / "run", 1, 3, ("cat", "[bold red]dog[/]", "a/b"))
    invoke("sample", str(run), "-n", "6", "--format", "png", "--out", str(tmp_path / "pngs"), "--steps", "3",
           "--sampler", "ddim", "--seed", "4")
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == ["00000-cat.png", "00001-cat.png", "00002-bold_red_dog.png", "00003-bold_red_dog.png",
                     "00004-a_b.png", "00005-a_b.png"]
    # the pixels are the grid's, image by image: the same seed drawn in-process
    pipe = ddpmkit.load_checkpoint(run)
    drawn = pipe.sample(6, seed=4, sampler="ddim", sampler_options={"steps": 3})
    for i, name in enumerate(names):
        with Image.open(tmp_path / "pngs" / name) as im:
            assert im.mode == "L" and im.size == (16, 16)
            px = torch.from_numpy(np.asarray(im))
        assert torch.equal(px, ((drawn[i, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


def test_npz_round_trip_gives_the_same_metric_values(tmp_path, digit_cache):
    """sample → npz → evaluate --images = evaluate on the checkpoint (same seed): bit for bit, labels included."""
    run = random_run(tmp_path / "run", 1, 10)
    metric = ["--metric", "digit-score,kid", "--set", f"metric.cache_dir={digit_cache}", "--set", "metric.features=digit-score",
              "--set", "metric.dataset=mnist-5k", "--set", "metric.reference_images=64", "--set", "metric.subset_size=10"]
    common = ["--sampler", "ddim", "--steps", "3", "--seed", "5"]
    invoke("evaluate", str(run), "-n", "30", *common, *metric, "--json", str(tmp_path / "direct.json"))
    invoke("sample", str(run), "-n", "30", *common, "--format", "npz", "--out", str(tmp_path / "s.npz"))
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (30, 16, 16, 1)
    assert data["arr_1"].tolist() == [i * 10 // 30 for i in range(30)]
    invoke("evaluate", "--images", str(tmp_path / "s.npz"), *metric, "--json", str(tmp_path / "npz.json"))
    direct, read = (json.loads((tmp_path / f).read_text())["results"] for f in ("direct.json", "npz.json"))
    assert read == direct  # every value, exactly
    assert "digit_conditional_accuracy" in read  # the labels came back from arr_1


def test_torch_fidelity_reads_the_png_folder_and_agrees(tmp_path, fidelity_weights):
    import torch_fidelity

    run = random_run(tmp_path / "run", 3, None)
    invoke("sample", str(run), "-n", "12", "--format", "png", "--out", str(tmp_path / "pngs"), "--sampler", "ddim",
           "--steps", "3")
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 12
    theirs = torch_fidelity.calculate_metrics(input1=str(tmp_path / "pngs"), isc=True, isc_splits=4, cuda=False,
                                              verbose=False, feature_extractor_weights_path=str(fidelity_weights),
                                              batch_size=10, save_cpu_ram=True, cache=False)
    invoke("evaluate", "--images", str(tmp_path / "pngs"), "--metric", "inception-score", "--set",
           "metric.protocol=torch-fidelity", "--set", f"metric.weights={fidelity_weights}", "--set", "metric.splits=4",
           "--set", "metric.batch_size=10",  # torch-fidelity's batches: the same convolutions, the same rounding
           "--json", str(tmp_path / "is.json"))
    ours = json.loads((tmp_path / "is.json").read_text())["results"]
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["inception_score_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-5, abs=1e-9)


def test_bad_format_targets_are_one_line(tmp_path):
    run = random_run(tmp_path / "run", 1, None)
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(cli, ["sample", str(run), "--format", "png", "--out", str(tmp_path / "afile")])
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: --out '{tmp_path / 'afile'}' is a file; --format png writes a folder of PNGs"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    r = CliRunner().invoke(cli, ["evaluate", "--images", str(tmp_path / "bad.npz"), "--metric", "kid"])
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: --images: '{tmp_path / 'bad.npz'}' is not an .npz")
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 1), np.float32))
    r = CliRunner().invoke(cli, ["evaluate", "--images", str(tmp_path / "float.npz"), "--metric", "kid"])
    assert r.exit_code == 2 and "arr_0 must be uint8 (N, H, W, C)" in r.stderr
