"""Cluster conditioning for unconditional runs (``--clusters K``).

Bao et al. 2022 ("Why Are Conditional Generative Models Better Than Unconditional Ones?") condition
an unconditional model on clusters of its own training data: no labels are used, yet the network
gets to know which mode an image belongs to, and sampling the clusters by their frequency draws from
the marginal

    p(x) = Σ_c p(c) · p(x | c),      p(c) = (training images in cluster c) / N

without guidance. Here a cluster is k-means (scikit-learn) on the training images' pixels, reduced
to 50 principal components; both run on one thread with a fixed seed, so the same data and seed give
the same clusters, and the cluster sizes are stored with the model so sampling needs no data.

On the default run's digits (``ddpmkit run --unconditional``) this is what lifts an unconditional
network from between-digit blends to digits (docs/benchmarks.md, issue 30).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ddpmkit.sdk.data import item_image

# Principal components the images are reduced to before k-means, and the most images k-means is fitted
# on (the rest are assigned to the nearest centre): enough for 28×28 digits and 32×32 photos alike.
COMPONENTS = 50
FIT_LIMIT = 20_000


def _images(dataset: Any) -> torch.Tensor:
    """Every training image as it is before augmentation, ``(N, C, H, W)``: an in-memory dataset's
    ``images`` tensor, else each item read once (under a forked RNG, so an augmenting dataset does not
    move the run's random stream)."""
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor) and images.ndim == 4 and len(images) == len(dataset):
        return images
    with torch.random.fork_rng(devices=[]):
        return torch.stack([item_image(dataset[i]) for i in range(len(dataset))])


def cluster_images(dataset: Any, k: int, seed: int = 0) -> np.ndarray:
    """The k-means cluster, ``0..k-1``, of each of ``dataset``'s images (``(N,)`` int64).

    Args:
        dataset: the run's training images (items ``image`` or ``(image, label)``; labels are not read).
        k: the number of clusters, ``2 <= k <= N``.
        seed: seeds the principal components' solver, which images k-means is fitted on, and its
            initialisation (k-means++, 4 starts).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    x = _images(dataset).reshape(len(dataset), -1).double().numpy()
    if not 2 <= k <= len(x):
        raise ValueError(f"clusters must lie in 2..{len(x)} (the training images), got {k}")
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.permutation(len(x))[:FIT_LIMIT]) if len(x) > FIT_LIMIT else np.arange(len(x))
    with threadpool_limits(limits=1):  # the same clusters whatever the machine's thread count
        pca = PCA(min(COMPONENTS, x.shape[1], len(fit)), svd_solver="randomized", random_state=seed).fit(x[fit])
        features = pca.transform(x)
        km = KMeans(k, n_init=4, random_state=seed).fit(features[fit])
        return km.predict(features).astype(np.int64)


def cluster_sizes(assignments: np.ndarray, k: int) -> tuple[int, ...]:
    """How many images each of the ``k`` clusters holds."""
    return tuple(int(c) for c in np.bincount(assignments, minlength=k))


def labels_by_frequency(sizes: tuple[int, ...] | list[int], n: int) -> torch.Tensor:
    """``n`` cluster labels drawn in proportion to ``sizes`` (stratified: cluster c takes a block of
    about n·p(c) of them, in cluster order), ``(n,)`` long. A cluster holding p(c) = 0.3 of the
    training images takes 3 of 10 labels."""
    p = torch.tensor(sizes, dtype=torch.float64)
    edges = torch.cumsum(p / p.sum(), 0)
    edges[-1] = 1.0
    # u < 1 = edges[-1], so the first edge above u is always a cluster's
    return torch.searchsorted(edges, (torch.arange(n, dtype=torch.float64) + 0.5) / n, right=True)


class ClusterLabelled(torch.utils.data.Dataset):
    """``dataset``'s images with their cluster in place of any label: items ``(image, cluster)``."""

    def __init__(self, dataset: Any, assignments: np.ndarray):
        self.dataset, self.clusters = dataset, torch.as_tensor(assignments, dtype=torch.long)
        self.in_memory = getattr(dataset, "in_memory", False)  # the loader's choice of workers reads it

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return item_image(self.dataset[i]), self.clusters[i]

    def __getitems__(self, idx: list[int]):
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(idx) if fetch is not None else [self.dataset[i] for i in idx]
        return [(item_image(item), self.clusters[i]) for item, i in zip(items, idx)]
