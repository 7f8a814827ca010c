"""Metric ``inception-score``: IS(G) = exp(E_x KL(p(y|x) ‖ p̂(y))) from an InceptionV3 (seed eq. 12–14).

``protocol=seed`` (default) uses timm's InceptionV3 as the seed report did; ``protocol=torch-fidelity``
reproduces torch-fidelity's IS (the protocol of published figures, e.g. DDPM's 9.46 on CIFAR-10)
given the same Inception 2015-12-05 weights file. See ``ddpmkit.metrics``.
"""

from __future__ import annotations

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.metrics import InceptionMetric, InceptionOptions, inception_score


@attrs.define(kw_only=True)
class InceptionScoreConfig(InceptionOptions):
    """Options of ``inception-score``.

    protocol, weights, pretrained, batch_size: see ``ddpmkit.sdk.metrics.InceptionOptions``.
    splits: K, the number of splits (mean ± std over them). Default 10.
    shuffle_seed: ``seed`` only: permute the images with this seed before splitting; None keeps
        their order. Default None.
    """

    splits: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    shuffle_seed: int | None = None


class InceptionScore(InceptionMetric):
    directions = {"inception_score": "maximize"}
    def logits(self, images: torch.Tensor, progress=None) -> torch.Tensor:
        return self.outputs(images, self.config.splits, "inception-score images", progress)[1]

    def __call__(self, images: torch.Tensor, progress=None) -> dict[str, float]:
        logits = self.logits(images, progress)
        gen = None if self.config.shuffle_seed is None else torch.Generator().manual_seed(self.config.shuffle_seed)
        mean, std = inception_score(logits, self.config.splits, self.config.protocol, gen)
        return {"inception_score": mean, "inception_score_std": std}


@ddpmkit.hookimpl
def register_metrics(register):
    register("inception-score", InceptionScore, InceptionScoreConfig, "Inception Score (seed or torch-fidelity protocol)")
