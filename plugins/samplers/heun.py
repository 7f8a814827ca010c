"""Sampler ``heun``: Heun's second-order method (Karras et al. 2022, Algorithm 1) on the ᾱ table.

In σ = √((1 − ᾱ)/ᾱ) with x scaled so that x_σ = x_0 + σ·ε, the probability-flow ODE is
dx/dσ = (x − x̂_0(x, σ))/σ. Each step from σ_i to σ_{i+1} (Δ = σ_{i+1} − σ_i):

    d_i = (x_i − x̂_0(x_i, σ_i))/σ_i,    x̃ = x_i + Δ · d_i                          (Euler predictor)
    x_{i+1} = x_i + Δ · (d_i + (x̃ − x̂_0(x̃, σ_{i+1}))/σ_{i+1}) / 2                  (trapezoid corrector)

two network calls per step, one for the last (σ = 0): 2·steps − 1 calls. The run's clipping clips
x̂_0. The update is diffusers' ``HeunDiscreteScheduler``, configured from the run's betas and target.

On a continuous process (``flow``) the same method runs on that process's own ODE and time grid
(``ddpmkit.sdk.ode``): 2·steps − 1 calls, the last step Euler's.
"""

from __future__ import annotations

import attrs

import ddpmkit
from ddpmkit.sdk.ode import ODESampler

from ._solver_loop import SPACINGS, SchedulerSampler, scheduler_kwargs

# Above this σ_max Heun's first step is refused unless it starts lower (leading spacing); the
# built-in linear, quadratic and sigmoid schedules at T = 1000 have σ_max of 157, 37 and 159.
SIGMA_MAX_LIMIT = 1000.0


@attrs.define
class HeunConfig:
    """Options of ``heun``.

    steps: solver steps, 1..T; network calls are 2·steps − 1. Default 10 (19 calls).
    karras_sigmas: Karras et al.'s σ spacing (ρ = 7) instead of ``timestep_spacing``. Default False.
    timestep_spacing: ``linspace`` (default), ``leading`` or ``trailing``.
    """

    steps: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    karras_sigmas: bool = False
    timestep_spacing: str = attrs.field(default="linspace", validator=attrs.validators.in_(SPACINGS))


def make(config: HeunConfig, *, diffusion: ddpmkit.GaussianDiffusion) -> SchedulerSampler | ODESampler:
    if getattr(diffusion, "continuous", False):
        if config.karras_sigmas or config.timestep_spacing != "linspace":
            raise ddpmkit.DdpmkitError(f"heun: karras_sigmas and timestep_spacing are for the vp process; on "
                                       f"'{diffusion.name}' heun steps on that process's own time grid (drop them)")
        return ODESampler(diffusion, config.steps, heun=True)
    from diffusers import HeunDiscreteScheduler

    ab = diffusion.alphas_cumprod.double()
    sigma_max = float(((1 - ab[-1]) / ab[-1]).sqrt())
    if sigma_max > SIGMA_MAX_LIMIT and (config.karras_sigmas or config.timestep_spacing != "leading"):
        # The first step is a trapezoid from σ_max to the next σ, over orders of magnitude in which the
        # ODE's slope changes as much: on Gaussian data with the exact denoiser the cosine schedule's
        # σ_max ≈ 2·10⁴ gives 224× the data's variance at 10 steps and 5.7× at 20 (linspace; Karras:
        # 9.5×, 1.8×). Leading spacing starts at t = T − T/steps, where σ is small (1.08×, 1.03×).
        raise ddpmkit.DdpmkitError(
            f"heun: the schedule's σ_max = {sigma_max:.3g} makes its first step a trapezoid over orders of "
            f"magnitude of σ (samples far too wide); use timestep_spacing=leading without karras_sigmas, "
            "or another sampler (dpm-solver++, unipc)")

    scheduler = HeunDiscreteScheduler(
        **scheduler_kwargs(diffusion, config.steps, "heun"), use_karras_sigmas=config.karras_sigmas,
        clip_sample=diffusion.clip_sample, clip_sample_range=diffusion.clip_range,
        timestep_spacing=config.timestep_spacing)
    return SchedulerSampler(scheduler, config.steps, name="heun", repeats_timesteps=True)


make.processes = ("vp", "ode")  # vp through diffusers; any continuous process on its own ODE


@ddpmkit.hookimpl
def register_samplers(register):
    register("heun", make, HeunConfig, "Heun's 2nd-order ODE solver (Karras et al. 2022): 2*steps-1 calls")
