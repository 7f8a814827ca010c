"""Metric ``precision-recall``: improved precision and recall (Kynkäänniemi et al. 2019).

Precision: the share of generated images that fall inside the real images' k-NN manifold
(fidelity); recall: the share of real images inside the generated images' manifold (coverage:
a model that draws only a few kinds of digit has high precision and low recall). On the features
of ``features`` (Inception pool3 with the same weights handling as ``fid``, or the digit
classifier's), computed as torch-fidelity's ``prc`` (``ddpmkit.sdk.metrics.precision_recall``).
"""

from __future__ import annotations

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.metrics import FeatureMetric, FeatureOptions, precision_recall


@attrs.define(kw_only=True)
class PrecisionRecallConfig(FeatureOptions):
    """Options of ``precision-recall`` (plus ``features`` and the real-image and Inception options
    of ``ddpmkit.sdk.metrics.FeatureOptions``).

    neighbourhood: k of the k-NN balls. Default 3.
    real_images: real images compared, a fixed random subset of the reference (the manifolds are
        fairest at equal counts: 0 means as many as the generated images). Default 0.
    distance_batch: rows per chunk of the distance matrix. Default 10000.
    """

    neighbourhood: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    real_images: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    distance_batch: int = attrs.field(default=10000, validator=attrs.validators.ge(1))


class PrecisionRecall(FeatureMetric):
    directions = {"pr_f_score": "maximize", "precision": "maximize", "recall": "maximize"}
    def __call__(self, images: torch.Tensor, progress=None) -> dict[str, float]:
        c = self.config
        fake = self.features(images, progress, min_count=c.neighbourhood + 1, what="precision-recall images")
        real = self.reference_features(images.shape[-1], images.shape[1])
        keep = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:c.real_images or len(fake)]
        real = real[keep.sort().values]  # a fixed random subset: datasets are often ordered by class
        precision, recall = precision_recall(fake, real, c.neighbourhood, c.distance_batch)
        f = 2 * precision * recall / max(precision + recall, 1e-12)
        return {"precision": precision, "recall": recall, "pr_f_score": f}


@ddpmkit.hookimpl
def register_metrics(register):
    register("precision-recall", PrecisionRecall, PrecisionRecallConfig,
             "improved precision (fidelity) and recall (coverage) on k-NN feature manifolds")
