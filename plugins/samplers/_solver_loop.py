"""The loop shared by the solver samplers (``dpm-solver++``, ``unipc``, ``heun``, ``euler-ancestral``).

Each of those plugins configures a diffusers scheduler from the run's own ``GaussianDiffusion`` —
its exact betas, its prediction target (ε, x0 or v) — and hands it to :class:`SchedulerSampler`,
which runs the scheduler's step as ddpmkit's sampler contract asks:

    x_T ~ N(0, s²·I), s = the scheduler's init_noise_sigma: 1 for the α-parametrised solvers
          (dpm-solver++, unipc); for the σ-parametrised ones (heun, euler-ancestral) σ_max with
          linspace or trailing spacing and √(σ_max² + 1) with leading spacing (diffusers' rule)
    for t in the scheduler's timesteps:
        out = net(scale(x, t), t)            # the run's network (guided or not: the sampler never knows)
        out = clipped(out)                   # when the run clips x̂_0 (--clip): see below
        x = scheduler.step(out, t, x)        # the solver's update
    return x

With the run's clipping on, the network's output is replaced by the output that predicts the clipped
x̂_0 at the scheduler's own σ (α_t = 1/√(σ² + 1), σ_t = σ·α_t, x_t the network's input):

    x̂_0 = clip((x_t − σ_t·ε̂)/α_t),   ε̂' = (x_t − α_t·x̂_0)/σ_t          (ε prediction)
    x̂_0 = clip(α_t·x_t − σ_t·v̂),     v̂' = (α_t·x_t − x̂_0)/σ_t          (v prediction)
    x̂_0 = clip(x̂_0)                                                      (x0 prediction)

so every solver steps along the clipped x̂_0, as DDIM's ``clipped_epsilon`` and guided-diffusion do.
(For the range [−1, 1] this is what diffusers' ``thresholding=True`` with its default
``sample_max_value=1`` does inside dpm-solver++ and unipc; euler-ancestral has no such switch.)

This is a helper of the built-in plugins, not a plugin: it registers nothing.
"""

from __future__ import annotations

import attrs
import torch

import ddpmkit
from ddpmkit.diffusion import DIFFUSERS_PREDICTION

SPACINGS = ("leading", "trailing", "linspace")


def scheduler_kwargs(diffusion: ddpmkit.GaussianDiffusion, steps: int, name: str) -> dict:
    """The keyword arguments every diffusers scheduler takes from the run: T, betas, prediction."""
    T = diffusion.num_timesteps
    if steps > T:
        raise ddpmkit.DdpmkitError(f"{name}: --steps {steps} is more than the model's T = {T}")
    return {"num_train_timesteps": T, "trained_betas": diffusion.betas.double().cpu().numpy(),
            "prediction_type": DIFFUSERS_PREDICTION[diffusion.prediction]}


@attrs.define
class ThresholdingOptions:
    """The options of diffusers' x̂_0 thresholding, for the solvers that have it (dpm-solver++, unipc).

    thresholding: dynamic thresholding of x̂_0 (Saharia et al. 2022): per image s = the
        ``dynamic_thresholding_ratio`` quantile of |x̂_0| clamped to [1, ``sample_max_value``], then
        x̂_0 → clamp(x̂_0, −s, s)/s. Default False. (With ``sample_max_value`` 1 it is clipping to
        [−1, 1], which ``--clip`` gives every sampler.)
    dynamic_thresholding_ratio: that quantile, in (0, 1]. Default 0.995.
    sample_max_value: the largest s, >= 1. Default 1.0 (diffusers' default).
    """

    thresholding: bool = False
    dynamic_thresholding_ratio: float = attrs.field(default=0.995, validator=[attrs.validators.gt(0.0),
                                                                           attrs.validators.le(1.0)])
    sample_max_value: float = attrs.field(default=1.0, validator=attrs.validators.ge(1.0))


def thresholding_kwargs(config: ThresholdingOptions) -> dict:
    """The scheduler keywords of those options."""
    return {"thresholding": config.thresholding, "dynamic_thresholding_ratio": config.dynamic_thresholding_ratio,
            "sample_max_value": config.sample_max_value}


def clip_kwargs(diffusion: ddpmkit.GaussianDiffusion) -> dict:
    """:class:`SchedulerSampler`'s ``clip_range`` and ``prediction`` for the run's clipping (none if off)."""
    return {"clip_range": diffusion.clip_range if diffusion.clip_sample else None, "prediction": diffusion.prediction}


class SchedulerSampler:
    """A ddpmkit sampler around a configured diffusers scheduler.

    Args:
        scheduler: a diffusers scheduler, already built from the run's betas.
        steps: the number of solver steps (``set_timesteps(steps)``).
        stochastic: whether ``step`` draws noise (it then gets the sampler's generator).
        name: the sampler's name, for error messages.
        repeats_timesteps: whether the scheduler may repeat its first timestep (Heun's 2 calls per step).
        clip_range: clip x̂_0 to ``[-clip_range, clip_range]`` by rewriting the network's output (above);
            ``None`` (default): no clipping here (the run does not clip, or the scheduler clips itself).
        prediction: the network's target, ``epsilon``, ``v`` or ``x0`` (needed with ``clip_range``).

    ``num_steps`` is the number of network calls, ``len(scheduler.timesteps)`` (Heun: 2·steps − 1).
    The network gets long ``t``, as the predictor contract says. Where the scheduler's timestep falls
    between two training timesteps (Karras σ's; ``linspace`` spacing of the σ-parametrised
    ``heun`` and ``euler-ancestral``) the network gets the nearest one, the only ones it was trained
    on; the scheduler keeps its exact σ. (diffusers passes the fraction to the UNet instead.)
    """

    uses_clip_sample = True  # the run's clipping: here (clip_range) or in the scheduler (heun)

    def __init__(self, scheduler, steps: int, stochastic: bool = False, name: str = "sampler",
                 repeats_timesteps: bool = False, clip_range: float | None = None, prediction: str = "epsilon"):
        self.scheduler, self.steps, self.stochastic = scheduler, steps, stochastic
        self.clip_range, self.prediction = clip_range, prediction
        scheduler.set_timesteps(steps)
        self.timesteps = [int(v) for v in scheduler.timesteps.double().round()]  # the network's t
        self.num_steps = len(self.timesteps)
        first = [float(v) for v in scheduler.timesteps].count(float(scheduler.timesteps[0]))
        if not repeats_timesteps and first > 1:
            # Karras σ's on a schedule with a huge σ_max (cosine: β_T = 0.999, σ_max ≈ 2·10⁴) bunch up
            # at the first steps; diffusers' multistep solvers find a repeated first timestep at its
            # second place and overrun their step index (IndexError) or fail an assertion. Refused
            # here, before any sampling. (Repeats at the end, t = 0, are harmless.)
            sigma_max = float(((1 - scheduler.alphas_cumprod[-1]) / scheduler.alphas_cumprod[-1]) ** 0.5)
            raise ddpmkit.DdpmkitError(
                f"{name}: its first {first} of {steps} steps fall on the same training timestep t = "
                f"{self.timesteps[0]} (the schedule's σ_max = {sigma_max:.3g}), which the solver cannot step "
                "through; use karras_sigmas=false, fewer steps, or a schedule with a smaller σ_max (e.g. linear)")

    @torch.inference_mode()
    def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32):
        s = self.scheduler
        s.set_timesteps(self.steps, device=device)  # resets the multistep history and step index
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype) * float(s.init_noise_sigma)
        extra = {"generator": generator} if self.stochastic else {}
        channels = shape[1]
        for k, t in enumerate(s.timesteps):
            tb = torch.full((shape[0],), self.timesteps[k], dtype=torch.long, device=device)
            out = model(s.scale_model_input(x, t), tb)
            if out.shape[1] != channels:  # a learned variance: the solvers use the prediction only
                out = out[:, :channels]
            if self.clip_range is not None:
                out = self._clipped(out, s.scale_model_input(x, t), float(s.sigmas[k]))
            x = s.step(out, t, x, **extra).prev_sample
            if progress is not None:
                progress(k + 1)
        return x.to(dtype)

    def _clipped(self, out, xt, sigma: float):
        """The output that predicts x̂_0 clipped to ±clip_range at σ (the formulas in the module doc)."""
        r, a = self.clip_range, 1.0 / (sigma * sigma + 1.0) ** 0.5
        s = sigma * a  # σ_t
        if self.prediction == "x0":
            return out.clamp(-r, r)
        if self.prediction == "v":
            return (a * xt - (a * xt - s * out).clamp(-r, r)) / s
        return (xt - a * ((xt - s * out) / a).clamp(-r, r)) / s
