"""Metric ``fid``: Fréchet Inception Distance between the images and a dataset's real images.

pool3 (2048-d) features of the same InceptionV3 as ``inception-score`` (``seed`` or
``torch-fidelity`` protocol); the real statistics (μ, Σ) are computed once per dataset,
resolution, image count, protocol and weights, and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import attrs
import numpy as np
import torch

import ddpmkit
from ddpmkit.data import default_data_root, folder_fingerprint
from ddpmkit.metrics import InceptionMetric, InceptionOptions, feature_statistics, file_digest, frechet_distance


@attrs.define(kw_only=True)
class FIDConfig(InceptionOptions):
    """Options of ``fid``.

    dataset: the real images, a dataset plugin by name. Default ``mnist-5k``.
    data_root: that dataset's data_root, if it needs one. Default: its own default.
    reference_images: at most this many real images. Default 10000.
    protocol, weights, pretrained, batch_size: see ``ddpmkit.metrics.InceptionOptions``.
    cache_dir: where real statistics are kept. Default ``<cache>/ddpmkit/fid-stats``.
    """

    dataset: str = "mnist-5k"
    data_root: str | None = None
    reference_images: int = attrs.field(default=10000, validator=attrs.validators.ge(2))
    cache_dir: str | None = None


class FID(InceptionMetric):
    def features(self, images: torch.Tensor, progress=None) -> torch.Tensor:
        return self.outputs(images, 2, "fid images", progress)[0]

    def reference(self, resolution: int) -> tuple[np.ndarray, np.ndarray, Path]:
        c = self.config
        root = Path(c.data_root).expanduser().resolve() if c.data_root else None
        key = json.dumps({"dataset": c.dataset, "data_root": str(root) if root else str(default_data_root().resolve()),
                          "contents": folder_fingerprint(root) if root else None, "resolution": resolution,
                          "n": c.reference_images, "protocol": c.protocol, "weights": file_digest(c.weights)},
                         sort_keys=True)
        cache = Path(c.cache_dir) if c.cache_dir else default_data_root().parent / "fid-stats"
        path = cache / f"{c.dataset}-{resolution}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if path.exists():
            from safetensors.numpy import load_file

            stats = load_file(str(path))
            return stats["mu"], stats["sigma"], path
        options = {"resolution": resolution, "limit": c.reference_images}
        if root:
            options["data_root"] = str(root)
        ds = ddpmkit.build("dataset", c.dataset, options)
        x = torch.stack([(item[0] if isinstance(item, (tuple, list)) else item) for item in
                         (ds[i] for i in range(len(ds)))])
        mu, sigma = feature_statistics(self.features(x))
        from safetensors.numpy import save_file

        ddpmkit.checkpoint.atomic_write(path, lambda tmp: save_file({"mu": mu, "sigma": sigma}, tmp,
                                                                   metadata={"key": key}))
        return mu, sigma, path

    def __call__(self, images: torch.Tensor, progress=None) -> dict[str, float]:
        mu, sigma = feature_statistics(self.features(images, progress))
        mu_r, sigma_r, _ = self.reference(images.shape[-1])
        return {"fid": frechet_distance(mu, sigma, mu_r, sigma_r)}


@ddpmkit.hookimpl
def register_metrics(register):
    register("fid", FID, FIDConfig, "Fréchet Inception Distance against a dataset (cached real statistics)")
