"""Losses ``smoothl1`` (the seed's choice) and ``mse`` (the paper's L_simple, eq. 10)."""

import attrs
import torch.nn.functional as F

import ddpmkit


@attrs.define
class SmoothL1Config:
    """Options of ``smoothl1``. beta: where the loss turns from quadratic to linear (> 0). Default 1.0."""

    beta: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))


def smoothl1(config: SmoothL1Config):
    """``loss(prediction, target, reduction="mean")``; ``reduction="none"`` gives per-element losses."""
    return lambda prediction, target, reduction="mean": F.smooth_l1_loss(prediction, target, beta=config.beta,
                                                                        reduction=reduction)


def mse(config=None):
    return lambda prediction, target, reduction="mean": F.mse_loss(prediction, target, reduction=reduction)


@ddpmkit.hookimpl
def register_losses(register):
    register("smoothl1", smoothl1, SmoothL1Config, "Smooth L1 (Huber) between target and prediction")
    register("mse", mse, None, "mean squared error, the paper's L_simple")
