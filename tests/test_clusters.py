"""Cluster conditioning of unconditional runs (``--clusters K``, ddpmkit.run.clusters): the clusters,
the frequencies sampling draws them by, the run, its resume, and what `--unconditional` means per preset."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import resume_equals_uninterrupted, small_run

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.clusters import ClusterLabelled, cluster_images, cluster_sizes, labels_by_frequency
from ddpmkit.run.presets import resolve_run_config


class Groups(torch.utils.data.Dataset):
    """Three kinds of 8×8 images (a bright left half, a bright top half, a bright centre), 5 / 10 / 15
    of each with noise; items (image, label); ``in_memory`` with an ``images`` tensor unless ``plain``."""

    def __init__(self, plain: bool = False):
        g = torch.Generator().manual_seed(0)
        base = -torch.ones(3, 1, 8, 8)
        base[0, :, :, :4] = 1
        base[1, :, :4, :] = 1
        base[2, :, 2:6, 2:6] = 1
        self.kind = torch.tensor([0] * 5 + [1] * 10 + [2] * 15)
        x = base[self.kind] + 0.3 * torch.randn(30, 1, 8, 8, generator=g)
        if plain:
            self._x = x
        else:
            self.images, self.in_memory = x, True

    def __len__(self):
        return len(self.kind)

    def __getitem__(self, i):
        x = self.images[i] if hasattr(self, "images") else self._x[i]
        if torch.rand(()) < 0.5:  # augmentation that draws from the global generator
            x = x + 0
        return x, int(self.kind[i])


def test_clusters_find_the_groups_deterministically_without_moving_the_random_stream():
    a = cluster_images(Groups(), 3, seed=0)
    for k in range(3):  # each group is one cluster, and the three clusters differ
        assert len(set(a[(Groups().kind == k).numpy()].tolist())) == 1
    assert len(set(a.tolist())) == 3
    assert sorted(cluster_sizes(a, 3)) == [5, 10, 15]
    assert (cluster_images(Groups(), 3, seed=0) == a).all()
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    b = cluster_images(Groups(plain=True), 3, seed=0)  # read item by item: the same images, the same clusters
    assert (b == a).all() and torch.equal(torch.rand(1), before)
    with pytest.raises(ValueError, match=r"clusters must lie in 2\.\.30"):
        cluster_images(Groups(), 31)


def test_cluster_labelled_items_carry_the_cluster_not_the_label():
    ds = ClusterLabelled(Groups(), torch.arange(30) % 4)
    x, c = ds[6]
    assert torch.equal(x, Groups().images[6]) and int(c) == 2
    assert [int(c) for _, c in ds.__getitems__([1, 2, 7])] == [1, 2, 3]
    assert ds.in_memory and len(ds) == 30


def test_labels_by_frequency_are_the_clusters_shares():
    assert labels_by_frequency((3, 0, 7), 10).tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2]
    sizes = (1, 2, 3, 4, 50, 40)
    labels = labels_by_frequency(sizes, 1000)
    counts = torch.bincount(labels, minlength=6)
    expected = torch.tensor(sizes, dtype=torch.float64) * 1000 / sum(sizes)
    assert (counts - expected).abs().max() <= 1 and counts.sum() == 1000
    assert (labels.diff() >= 0).all()  # in blocks, cluster by cluster


def test_unconditional_means_clusters_on_the_default_only():
    def resolved(preset=None, names=None, **changes):
        return resolve_run_config(preset, names, {}, changes)

    assert resolved(class_conditional=False).clusters == 100  # `ddpmkit run --unconditional`
    assert resolved(class_conditional=False, clusters=0).clusters == 0  # --unconditional --clusters 0
    assert resolved(class_conditional=False, clusters=8).clusters == 8
    assert resolved().clusters == 0  # the default run itself is class-conditional
    assert resolved("laptop-vp", class_conditional=False).clusters == 0  # the previous default, as released
    assert resolved("tiny", class_conditional=False).clusters == 0
    assert resolved(names={"dataset": "cifar10"}, class_conditional=False).clusters == 0  # another dataset


def _run(args):
    return CliRunner().invoke(cli, ["run", *args])


def test_a_cluster_run_trains_samples_p_x_and_resumes_bit_for_bit(tmp_path, digit_cache, monkeypatch):
    run = tmp_path / "run"
    r = _run([*small_run(), "--unconditional", "--clusters", "4", "--max-steps", "4", "--checkpoint-every", "2",
              "--out", str(run)])
    assert r.exit_code == 0, r.output
    assert "no labels: unconditional, conditioned on 4 k-means clusters of the images" in r.stderr
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["num_classes"] == 4 and sum(data["clusters"]) == 64 and "classes" not in data
    pipe = ddpmkit.load_checkpoint(run)
    assert pipe.cluster_sizes == tuple(data["clusters"])
    assert torch.equal(pipe.class_labels(64), labels_by_frequency(pipe.cluster_sizes, 64))
    assert torch.bincount(pipe.class_labels(64), minlength=4).tolist() == data["clusters"]
    # the clusters are the same when the run is resumed: the weights end the same, bit for bit
    resume_equals_uninterrupted(run, tmp_path / "again", "step-00000004.safetensors")
    # clusters that came out differently (another scikit-learn, other data) are refused, not trained on
    third = tmp_path / "third"
    shutil.copytree(run, third)
    (third / "model.safetensors").unlink()
    with monkeypatch.context() as m:
        m.setattr("ddpmkit.run.clusters.cluster_images", lambda dataset, k, seed=0: np.arange(len(dataset)) % k)
        r = CliRunner().invoke(cli, ["run", "--resume", str(third), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 2 and "the training images' clusters differ from those stored in" in r.stderr, r.output
    # files are not named by cluster, and metrics are not told the clusters are digits
    r = CliRunner().invoke(cli, ["sample", str(run), "-n", "3", "--format", "png", "--out", str(tmp_path / "png"),
                                 "--no-progress", "--steps", "2", "--sampler", "ddim"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    r = CliRunner().invoke(cli, ["evaluate", str(run), "-n", "20", "--metric", "digit-score", "--set",
                                 f"metric.cache_dir={digit_cache}", "--json", str(tmp_path / "e.json"), "--no-progress",
                                 "--sampler", "ddim", "--steps", "2"])
    assert r.exit_code == 0, r.output
    scores = json.loads((tmp_path / "e.json").read_text())["by_metric"]["digit-score"]
    assert "digit_is" in scores and "digit_conditional_accuracy" not in scores


@pytest.mark.parametrize("args, message", [
    (["--class-conditional", "--clusters", "4"], "--clusters conditions the network on k-means clusters of the images "
                                                 "in place of labels; use it with --unconditional (or drop --clusters)"),
    (["--unconditional", "--clusters", "1"], "clusters must be 0 (none) or >= 2, got 1"),
    (["--unconditional", "--clusters", "65"], "clusters must lie in 2..64 (the training images), got 65"),
])
def test_bad_clusters_are_one_line(tmp_path, args, message):
    r = _run([*small_run(), *args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert message in r.stderr
