"""Metric ``kid``: Kernel Inception Distance (Bińkowski et al. 2018) against a dataset's real images.

Unbiased MMD² with the cubic polynomial kernel, averaged over random subsets, as torch-fidelity
computes it (``ddpmkit.sdk.metrics.kernel_inception_distance``); on the features of ``features``
(Inception pool3 with the same weights handling as ``fid``, or the digit classifier's). Unlike
FID it is unbiased, so it compares fairly across sample counts; values near 0 (even slightly
negative) mean the two sets are hard to tell apart.
"""

from __future__ import annotations

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.metrics import FeatureMetric, FeatureOptions, kernel_inception_distance


@attrs.define(kw_only=True)
class KIDConfig(FeatureOptions):
    """Options of ``kid`` (plus ``features`` and the real-image and Inception options of
    ``ddpmkit.sdk.metrics.FeatureOptions``).

    subsets: random subset pairs averaged. Default 100.
    subset_size: images per subset; lowered to the smaller set's size when larger. Default 1000.
    degree, gamma, coef0: the kernel (γ x·y + coef0)^degree; gamma ``None`` is 1/D. Defaults 3, None, 1.
    seed: seed of the subset draws (numpy RandomState). Default 2020 (torch-fidelity's).
    """

    subsets: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    subset_size: int = attrs.field(default=1000, validator=attrs.validators.ge(2))
    degree: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    gamma: float | None = None
    coef0: float = 1.0
    seed: int = 2020


class KID(FeatureMetric):
    directions = {"kid": "minimize"}
    def __call__(self, images: torch.Tensor, progress=None) -> dict[str, float]:
        c = self.config
        fake = self.features(images, progress, what="kid images")
        real = self.reference_features(images.shape[-1], images.shape[1])
        size = min(c.subset_size, len(fake), len(real))
        mean, std = kernel_inception_distance(fake, real, c.subsets, size, c.degree, c.gamma, c.coef0, c.seed)
        return {"kid": mean, "kid_std": std}


@ddpmkit.hookimpl
def register_metrics(register):
    register("kid", KID, KIDConfig, "Kernel Inception Distance against a dataset (unbiased, subsets)")
