"""Loss ``hybrid``: improved DDPM's L_hybrid = L_simple + λ · L_vlb (Nichol & Dhariwal 2021, §3.1).

L_simple is another loss plugin (``simple``, default ``mse``: the paper's eq. 10) between the
prediction and its target. L_vlb is the bound's term at the drawn t (``GaussianDiffusion.vlb_terms``:
the KL of eq. 5 for t ≥ 2, the discretized decoder for t = 1), in bits per dimension, with the
**mean stopped**: μ_θ is formed from the detached prediction, so L_vlb trains only the learned
variance and L_simple alone trains the mean. One uniform draw of t estimates L_vlb = Σ_t L_t as
T · L_t, so the term added is λ · T · L_t (with λ = 0.001 and T = 1000: L_t itself, improved-
diffusion's ``RESCALED_MSE``). Needs a predictor with a learned variance (``--learn-variance``):
without one L_vlb has nothing to train, and the run stops in one line.
"""

from __future__ import annotations

import attrs

import ddpmkit
from ddpmkit.diffusion import ModelOutput


@attrs.define
class HybridConfig:
    """Options of ``hybrid``.

    weight: λ of L_simple + λ · L_vlb. Default 0.001.
    simple: the loss plugin for L_simple. Default ``mse``.
    """

    weight: float = attrs.field(default=0.001, validator=attrs.validators.ge(0.0))
    simple: str = "mse"


def hybrid(config: HybridConfig):
    simple = ddpmkit.build("loss", config.simple, {})

    def loss(prediction, target, reduction="mean", *, context):
        d = context.diffusion
        if context.output.variance is None:
            raise ddpmkit.DdpmkitError("loss 'hybrid' trains a learned variance: run with --learn-variance "
                                       "(a predictor with 2C outputs and --variance learned_range)")
        frozen = ModelOutput(context.output.prediction.detach(), context.output.variance)  # stop-gradient on μ
        vlb = d.vlb_terms(frozen, context.x0, context.xt, context.t).to(prediction.dtype)   # (B,) bits/dim
        vlb = vlb * (config.weight * d.num_timesteps)
        per_element = simple(prediction, target, reduction="none")
        if reduction == "none":  # the per-sample mean of this is L_simple + λ·T·L_t
            return per_element + vlb.reshape(-1, *[1] * (per_element.ndim - 1))
        return per_element.mean() + vlb.mean()

    return loss


@ddpmkit.hookimpl
def register_losses(register):
    register("hybrid", hybrid, HybridConfig, "improved DDPM's L_simple + λ·L_vlb (mean stopped; learned variance)")
