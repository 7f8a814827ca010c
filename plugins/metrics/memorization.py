"""Metric ``memorization``: does the model copy its training images?

Samples, training images and held-out images are all compared as 8-bit images
(``ddpmkit.sdk.metrics.quantize``, as a saved image holds them): a training image replayed exactly is
at distance 0. For each generated image, its nearest training images are found in pixel space and in a feature
space (``features``: the digit classifier's for 1-channel images, InceptionV3 pool3 when weights
are given; the result names the space). A sample is a **near-copy** when

    d(x, nearest training image) / d(x, second-nearest training image) < 1/3        (``ratio``)

in pixel space (Euclidean). This is the rule of Yoon et al. 2023 ("Diffusion probabilistic models
generalize when they fail to memorize") and Gu et al. 2023 ("On memorization in diffusion
models"), chosen because it needs no calibration and no threshold on absolute distances, which
depend on resolution and data set: a copy is much closer to one training image than to any other,
while a new image lies between several. The same rule is applied to held-out real images (the
dataset's test split), which were never trained on and so give the rate a model that merely
matches the data distribution would show. Distances: Euclidean over pixels in [-1, 1] (so a
distance d means an RMS pixel difference d/√(C·H·W)).

Search is exact: ``torch.cdist`` in chunks (60,000 MNIST digits take a few seconds), FAISS's exact
``IndexFlatL2`` past 200,000 training images when it is installed (``ddpmkit[faiss]``).

After a call, ``figures(directory)`` writes ``nearest.png`` (samples beside their 3 nearest
training images) and ``distances.png`` (histograms of nearest-training distances, samples vs
held-out), as ``ddpmkit analyze`` and ``ddpmkit evaluate --figures`` do.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.metrics import (
    FeatureMetric,
    FeatureOptions,
    check_images,
    dataset_images,
    nearest_neighbours,
    quantize,
    random_subset,
    split_options,
)


@attrs.define(kw_only=True)
class MemorizationConfig(FeatureOptions):
    """Options of ``memorization`` (plus ``features`` and the options of
    ``ddpmkit.sdk.metrics.FeatureOptions``; ``dataset``/``data_root``/``reference_images`` name the
    training images only where there is no run, as for ``evaluate --images``).

    ratio: near-copy when nearest / second-nearest training distance is below this. Default 1/3.
    heldout_dataset: real images never trained on, the baseline. Default: the training dataset's
        plugin with ``split=test`` when it has a ``split`` option, else none.
    heldout_data_root: that dataset's data_root. Default: the training dataset's, else its own.
    heldout_images: held-out images compared (0: as many as the samples). Default 0.
    backend: nearest-neighbour search: ``auto``, ``torch`` or ``faiss``. Default ``auto``.
    """

    ratio: float = attrs.field(default=1 / 3, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])
    heldout_dataset: str | None = None
    heldout_data_root: str | None = None
    heldout_images: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    backend: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "torch", "faiss")))


def nn_ratios(dist: torch.Tensor) -> torch.Tensor:
    """d₁/d₂ from nearest-neighbour distances (N, ≥2); 0 where d₁ = 0 (an exact copy, even of a duplicate)."""
    d1, d2 = dist[:, 0], dist[:, 1]
    return torch.where(d1 == 0, torch.zeros_like(d1), d1 / d2.clamp_min(1e-12))


def copy_flags(dist: torch.Tensor, ratio: float) -> torch.Tensor:
    """Near-copy flags: d₁/d₂ < ``ratio``."""
    return nn_ratios(dist) < ratio


class Memorization(FeatureMetric):
    directions = {"memorized_share": "minimize"}
    def __init__(self, config: MemorizationConfig, *, device=None):
        super().__init__(config, device=device)
        self.last: dict | None = None

    # the images to compare ------------------------------------------------------------------
    def training_images(self, context, resolution: int) -> tuple[torch.Tensor, str | None, dict]:
        """(training images, their dataset plugin name, its options) — the run's when there is one."""
        pipe = getattr(context, "pipeline", None)
        if getattr(context, "dataset", None) is not None or pipe is not None:
            spec = pipe.config.dataset
            dataset = context.dataset
            if dataset is None:
                dataset = ddpmkit.build("dataset", spec.name, {**spec.options, "resolution": resolution})
            return quantize(dataset_images(dataset)), spec.name, dict(spec.options)
        c = self.config
        options = {"data_root": c.data_root} if c.data_root else {}
        return quantize(self.config.reference_set(resolution)), c.dataset, options

    def heldout_images(self, name: str | None, options: dict, resolution: int, count: int) -> torch.Tensor | None:
        """Up to ``count`` real images never trained on (a fixed random subset), or None."""
        c = self.config
        if c.heldout_dataset:
            name, options = c.heldout_dataset, {}
        if name is None:
            return None
        opts, has_split = split_options(name, options, resolution, "test", c.heldout_data_root)
        if not has_split:
            if c.heldout_dataset:
                raise ddpmkit.DdpmkitError(f"memorization: heldout_dataset '{name}' has no test split (no 'split' "
                                           f"option); name a dataset that has one, e.g. mnist")
            return None
        return quantize(random_subset(ddpmkit.build("dataset", name, opts), count)[0])

    # the metric -------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, progress=None, context=None) -> dict[str, float]:
        c = self.config
        images = quantize(check_images(images, 1, "memorization images"))
        res, ch = images.shape[-1], images.shape[1]
        train, name, options = self.training_images(context, res)
        heldout = self.heldout_images(name, options, res, c.heldout_images or len(images))
        k = 3
        _, feat = self.extractor(ch)
        spaces = {"pixel": lambda x: x.reshape(len(x), -1), "features": lambda x: feat(x)}
        out, found = {}, {}
        for space, fn in spaces.items():
            keys = fn(train)
            d, idx = nearest_neighbours(fn(images), keys, k, backend=c.backend)
            suffix = "" if space == "pixel" else "_features"
            found[space] = {"dist": d, "idx": idx}
            out[f"memorized_share{suffix}"] = float(copy_flags(d, c.ratio).double().mean())
            out[f"nn_distance_median{suffix}"] = float(d[:, 0].median())
            out[f"nn_ratio_min{suffix}"] = float(nn_ratios(d).min())  # the sample closest to the rule
            if heldout is not None:
                dh, _ = nearest_neighbours(fn(heldout), keys, k, backend=c.backend)
                found[space]["heldout_dist"] = dh
                out[f"heldout_memorized_share{suffix}"] = float(copy_flags(dh, c.ratio).double().mean())
                out[f"heldout_nn_distance_median{suffix}"] = float(dh[:, 0].median())
                out[f"heldout_nn_ratio_min{suffix}"] = float(nn_ratios(dh).min())
            if progress is not None:
                progress(len(images))
        self.last = {"images": images, "train": train, "found": found, "ratio": c.ratio}
        return out

    # figures ----------------------------------------------------------------------------------
    def figures(self, directory) -> list[Path]:
        """``nearest.png`` and ``distances.png`` for the last call, in ``directory``."""
        if self.last is None:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        last, found = self.last, self.last["found"]["pixel"]
        d, idx = found["dist"], found["idx"]
        ratio = nn_ratios(d)
        order = ratio.argsort()
        rows = list(dict.fromkeys(order[:4].tolist() + list(range(min(4, len(d))))))  # most copy-like, then the first
        show = lambda ax, x: ax.imshow(((x.permute(1, 2, 0).squeeze(-1) + 1) / 2).clamp(0, 1).numpy(),  # noqa: E731
                                       cmap="gray" if x.shape[0] == 1 else None, vmin=0, vmax=1)
        fig, axes = plt.subplots(len(rows), 4, figsize=(4 * 1.3, len(rows) * 1.35))
        for r, i in enumerate(rows):
            show(axes[r, 0], last["images"][i])
            axes[r, 0].set_title(f"sample {i}" + (" COPY" if ratio[i] < last["ratio"] else ""), fontsize=6)
            for j in range(3):
                show(axes[r, j + 1], last["train"][idx[i, j]])
                axes[r, j + 1].set_title(f"train #{int(idx[i, j])}  d={float(d[i, j]):.2f}", fontsize=6)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("samples (left; top: lowest nearest/second ratio) and their 3 nearest training images",
                     fontsize=7)
        fig.tight_layout()
        paths = [directory / "nearest.png"]
        fig.savefig(paths[0], dpi=130)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        import numpy as np

        for ax, (space, f) in zip(axes, self.last["found"].items()):
            sets = {"samples": f["dist"][:, 0].numpy()}
            if "heldout_dist" in f:
                sets["held-out real"] = f["heldout_dist"][:, 0].numpy()
            bins = np.histogram_bin_edges(np.concatenate(list(sets.values())), bins=30)
            for label, values in sets.items():
                ax.hist(values, bins=bins, alpha=0.55, label=f"{label} ({len(values)})", density=True)
            where = "pixels" if space == "pixel" else self.config.features if self.config.features != "auto" \
                else self.feature_space.split(" (")[0]
            ax.set_xlabel(f"Euclidean distance to the nearest training image ({where})", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(directory / "distances.png")
        fig.savefig(paths[1], dpi=130)
        plt.close(fig)
        return paths


@ddpmkit.hookimpl
def register_metrics(register):
    register("memorization", Memorization, MemorizationConfig,
             "near-copies of training images (nearest/second-nearest < 1/3), pixel and feature space")
