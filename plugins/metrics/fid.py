"""Metric ``fid``: Fréchet Inception Distance between the images and a dataset's real images.

pool3 (2048-d) features of the same InceptionV3 as ``inception-score`` (``seed`` or
``torch-fidelity`` protocol); the real statistics (μ, Σ) are computed once per dataset,
resolution, image count, protocol and weights, and cached on disk.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch

import ddpmkit
from ddpmkit.sdk.metrics import InceptionMetric, ReferenceOptions, feature_statistics, frechet_distance


@attrs.define(kw_only=True)
class FIDConfig(ReferenceOptions):
    """Options of ``fid``: the real images (``dataset``, ``data_root``, ``reference_images``,
    ``cache_dir``; see ``ddpmkit.sdk.metrics.ReferenceOptions``) and the InceptionV3 (``protocol``,
    ``weights``, ``pretrained``, ``batch_size``; see ``ddpmkit.sdk.metrics.InceptionOptions``)."""


class FID(InceptionMetric):
    directions = {"fid": "minimize"}
    def features(self, images: torch.Tensor, progress=None) -> torch.Tensor:
        return self.outputs(images, 2, "fid images", progress)[0]

    def reference(self, resolution: int) -> tuple[np.ndarray, np.ndarray, Path]:
        digest, key = self.config.reference_key(resolution)
        path = self.config.cache_path("", resolution, digest)
        if path.exists():
            from safetensors.numpy import load_file

            stats = load_file(str(path))
            return stats["mu"], stats["sigma"], path
        mu, sigma = feature_statistics(self.features(self.config.reference_set(resolution)))
        from safetensors.numpy import save_file

        ddpmkit.sdk.files.atomic_write(path, lambda tmp: save_file({"mu": mu, "sigma": sigma}, tmp,
                                                                   metadata={"key": key}))
        return mu, sigma, path

    def __call__(self, images: torch.Tensor, progress=None) -> dict[str, float]:
        mu, sigma = feature_statistics(self.features(images, progress))
        mu_r, sigma_r, _ = self.reference(images.shape[-1])
        return {"fid": frechet_distance(mu, sigma, mu_r, sigma_r)}


@ddpmkit.hookimpl
def register_metrics(register):
    register("fid", FID, FIDConfig, "Fréchet Inception Distance against a dataset (cached real statistics)")
