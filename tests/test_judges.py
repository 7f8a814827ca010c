"""digit-judges: two classifiers that differ in architecture and training data read samples against real
digits neither trained on (the real MNIST test split in ../shared/data; the ResNet judge trained small here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ddpmkit

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="../shared/data/mnist is absent")


@pytest.mark.slow
def test_real_digits_score_like_real_and_noised_ones_do_not_under_either_judge(digit_cache):
    from ddpmkit_plugins.metrics.digit_judges import REFERENCE, mnist_test

    judges = ddpmkit.build("metric", "digit-judges", {"mnist_root": str(SHARED_MNIST), "cache_dir": str(digit_cache),
                                                       "train_limit": 3000, "epochs": 3})
    x, y = mnist_test(str(SHARED_MNIST))
    with torch.inference_mode():  # as `ddpmkit evaluate` calls metrics: the judge still trains on first use
        judges(x[3000:3100])
    unseen_x, unseen_y = x[3000:-REFERENCE], y[3000:-REFERENCE]  # neither judge trained on these, nor are they the reference
    idx = torch.cat([torch.nonzero(unseen_y == k)[:30, 0] for k in range(10)])
    real, labels = unseen_x[idx], unseen_y[idx]
    scores = judges(real, context=SimpleNamespace(labels=labels))
    assert scores["cnn_accuracy"] > 0.95 and scores["resnet_accuracy"] > 0.9, scores  # held out: 10,000 / 2,000 digits
    for judge in ("cnn", "resnet"):
        assert 0.9 < scores[f"{judge}_is_ratio"] < 1.1 and 0.95 < scores[f"{judge}_confidence_ratio"] < 1.05, scores
        assert scores[f"{judge}_classes_present"] == 10
    noised = (real + 0.8 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    worse = judges(noised, context=SimpleNamespace(labels=labels))
    assert worse["judges_min_is_ratio"] < 0.8 * scores["judges_min_is_ratio"], worse
    assert worse["judges_min_is_ratio"] == min(worse["cnn_is_ratio"], worse["resnet_is_ratio"])
    # without labels: equal counts per class; more of one digit than the reference holds is one line
    assert judges(real)["cnn_is_real"] == pytest.approx(scores["cnn_is_real"])
    with pytest.raises(ddpmkit.DdpmkitError, match="samples of digit 0, but the real reference has"):
        judges(real[:2].repeat(200, 1, 1, 1), context=SimpleNamespace(labels=torch.zeros(400, dtype=torch.long)))
