"""What did the model learn: KID and precision/recall (against torch-fidelity), memorisation
(a model that replays its training images is flagged; held-out real images are not), and
several metrics in one evaluate pass."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import U8, image_sets
from PIL import Image

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.sdk.metrics import dataset_images, kernel_inception_distance, nearest_neighbours, precision_recall

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def save_folder(folder: Path, images_u8: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images_u8):
        arr = img.permute(1, 2, 0).squeeze(-1).numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


# -- the math on features, against torch-fidelity's own functions -----------------------------------
def test_kid_and_precision_recall_math_match_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 64, generator=g, dtype=torch.float64)
    b = torch.randn(400, 64, generator=g, dtype=torch.float64) * 1.1 + 0.2
    theirs = kid_features_to_metric(a, b, kid_subsets=20, kid_subset_size=100, kid_kernel="poly",
                                    kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                    rng_seed=2020, verbose=False)
    mean, std = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)
    assert mean > 0.05  # the sets differ: far from 0
    c = torch.randn(400, 64, generator=g, dtype=torch.float64)  # a second draw of a's distribution
    same, _ = kernel_inception_distance(a, c, subsets=50, subset_size=200)
    assert abs(same) < mean / 10  # one distribution: ~0 (unbiased)
    pr = prc_features_to_metric(a.float(), b.float(), prc_neighborhood=3, prc_batch_size=10000,
                                save_cpu_ram=False, verbose=False)
    p, r = precision_recall(a, b, 3, batch_size=128)  # chunked: must not change the answer
    assert p == pytest.approx(pr["precision"], rel=1e-6) and r == pytest.approx(pr["recall"], rel=1e-6)
    assert 0.1 < r < 0.9 and p != r
    assert precision_recall(b, b) == (1.0, 1.0)
    assert precision_recall(b + 100, b) == (0.0, 0.0)


def test_nearest_neighbours_exact_and_faiss_agree():
    g = torch.Generator().manual_seed(1)
    keys, queries = torch.randn(2000, 49, generator=g), torch.randn(50, 49, generator=g)
    d, idx = nearest_neighbours(queries, keys, k=3, batch_size=7)
    brute = torch.cdist(queries.double(), keys.double())
    ref_d, ref_i = brute.topk(3, largest=False)
    assert torch.equal(idx, ref_i) and torch.allclose(d, ref_d, rtol=1e-12)
    pytest.importorskip("faiss", reason="faiss-cpu (the test extra) is not installed")
    d2, idx2 = nearest_neighbours(queries, keys, k=3, backend="faiss")
    assert torch.equal(idx2, idx) and torch.allclose(d2, d, rtol=1e-12)


# -- the metrics on images and InceptionV3 weights, against torch-fidelity end to end -------------
@pytest.mark.slow
def test_kid_and_precision_recall_plugins_match_torch_fidelity(fidelity_weights, tmp_path):
    import torch_fidelity

    a, b = image_sets(n=16)
    close_dir = save_folder(tmp_path / "close", b)
    # KID against the second set under strong pixel noise, so KID (≈ 0.03) is large against float32
    # rounding: torch-fidelity computes the kernels in float32 (ddpmkit in float64), which on sets as
    # close as image_sets' (KID ≈ 0.004) alone moves its figure by 2e-5 relative
    g = torch.Generator().manual_seed(5)
    far = (b.float() + torch.randint(-80, 80, b.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    far_dir = save_folder(tmp_path / "far", far)
    tf = dict(feature_extractor="inception-v3-compat", feature_layer_prc="2048", cuda=False, verbose=False,
              feature_extractor_weights_path=str(fidelity_weights), cache=False, save_cpu_ram=True)  # no workers
    common = {"protocol": "torch-fidelity", "weights": str(fidelity_weights), "features": "inception",
              "dataset": "image-folder", "cache_dir": str(tmp_path / "cache")}
    theirs = torch_fidelity.calculate_metrics(input1=U8(a), input2=U8(far), kid=True, kid_subset_size=8,
                                              kid_subsets=15, **tf)
    kid = ddpmkit.build("metric", "kid", {**common, "data_root": str(far_dir), "subset_size": 8, "subsets": 15},
                        device="cpu")
    fake = a.float() / 127.5 - 1
    ours = kid(fake)
    assert kid.feature_space.startswith("inception pool3 (torch-fidelity protocol")
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    # the std of 15 subset estimates is a difference of float32 sums in torch-fidelity: 1.05e-5 apart
    # on one processor (2026-12-04), under 1e-5 on another
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=5e-5)
    assert ours["kid"] > 0.01  # non-trivial: the two sets differ under these weights
    theirs = torch_fidelity.calculate_metrics(input1=U8(a), input2=U8(b), prc=True, **tf)
    prc = ddpmkit.build("metric", "precision-recall", {**common, "data_root": str(close_dir)}, device="cpu")
    ours = prc(fake)  # the same images in the same space: their features are reused, not recomputed
    assert ours["precision"] == pytest.approx(theirs["precision"], rel=1e-5)
    assert ours["recall"] == pytest.approx(theirs["recall"], rel=1e-5)
    assert 0 < ours["precision"] < 1 or 0 < ours["recall"] < 1  # not a trivial 0/1 answer
    assert len(list((tmp_path / "cache").glob("features-image-folder-32-*.safetensors"))) == 2  # real features cached


# -- memorisation ---------------------------------------------------------------------------------
class Replay:
    """A 'model' that returns its training images: a dataset plugin wrapped as a sampler."""

    @staticmethod
    @ddpmkit.hookimpl
    def register_samplers(register):
        class ReplaySampler:
            num_steps = 1

            def __init__(self):
                self.images = dataset_images(ddpmkit.build("dataset", "mnist-5k", {"limit": 64, "resolution": 16}))

            def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32, **kw):
                pick = torch.randperm(len(self.images), generator=generator)[:shape[0]]
                if progress is not None:
                    progress(1)
                return self.images[pick].to(device, dtype)

        register("replay", lambda: ReplaySampler(), None, "returns training images")


@pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="../shared/data/mnist is absent")
def test_memorization_flags_replayed_training_images_not_heldout_ones(tmp_path, tiny_args, digit_cache):
    ddpmkit.register_plugin(Replay(), name="replay")
    run = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(cli, ["run", "--out", str(run), *tiny_args])
    assert r.exit_code == 0, r.output
    heldout = ["--set", "metric.heldout_dataset=mnist", "--set", f"metric.heldout_data_root={SHARED_MNIST}",
               "--set", f"metric.cache_dir={digit_cache}"]
    r = runner.invoke(cli, ["analyze", str(run), "-n", "40", "--sampler", "replay", "--no-progress", "--device", "cpu",
                            "--metric", "digit-score", *heldout])
    assert r.exit_code == 0, r.output
    out = json.loads((run / "analysis" / "analysis.json").read_text())
    res = out["results"]
    assert res["memorized_share"] == 1.0 and res["memorized_share_features"] == 1.0 and res["nn_distance_median"] == 0
    assert res["heldout_memorized_share"] <= 0.05  # real digits never trained on are not copies
    assert res["heldout_nn_distance_median"] > 1.0
    assert out["feature_spaces"]["memorization"].startswith("digit-cnn")
    assert "digit_is" in out["by_metric"]["digit-score"]  # several metrics, one sampling pass
    for name in ("nearest.png", "distances.png"):
        with Image.open(run / "analysis" / name) as im:
            assert im.size[0] > 300 and len(set(im.convert("L").getdata())) > 10  # a real figure
    # held-out real digits evaluated as 'samples' against the same training images: not copies
    folder = tmp_path / "heldout"
    digits = dataset_images(ddpmkit.build("dataset", "mnist", {"split": "test", "resolution": 16, "limit": 40,
                                                               "data_root": str(SHARED_MNIST)}))
    save_folder(folder, ((digits + 1) * 127.5).round().to(torch.uint8))
    r = runner.invoke(cli, ["evaluate", "--images", str(folder), "--metric", "memorization", "--no-progress",
                            "--set", "metric.dataset=mnist-5k", "--set", "metric.reference_images=64", *heldout,
                            "--json", str(tmp_path / "h.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "h.json").read_text())["results"]
    assert res["memorized_share"] <= 0.05 and res["nn_distance_median"] > 1.0
