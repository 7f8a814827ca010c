"""Sampler ``heun``: Heun's second-order method (Karras et al. 2022, Algorithm 1) on the ᾱ table.

In σ = √((1 − ᾱ)/ᾱ) with x scaled so that x_σ = x_0 + σ·ε, the probability-flow ODE is
dx/dσ = (x − x̂_0(x, σ))/σ. Each step from σ_i to σ_{i+1} (Δ = σ_{i+1} − σ_i):

    d_i = (x_i − x̂_0(x_i, σ_i))/σ_i,    x̃ = x_i + Δ · d_i                          (Euler predictor)
    x_{i+1} = x_i + Δ · (d_i + (x̃ − x̂_0(x̃, σ_{i+1}))/σ_{i+1}) / 2                  (trapezoid corrector)

two network calls per step, one for the last (σ = 0): 2·steps − 1 calls. The run's clipping clips
x̂_0. The update is diffusers' ``HeunDiscreteScheduler``, configured from the run's betas and target.
"""

from __future__ import annotations

import attrs

import ddpmkit

from ._solver_loop import SPACINGS, SchedulerSampler, scheduler_kwargs


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


def make(config: HeunConfig, *, diffusion: ddpmkit.GaussianDiffusion) -> SchedulerSampler:
    from diffusers import HeunDiscreteScheduler

    scheduler = HeunDiscreteScheduler(
        **scheduler_kwargs(diffusion, config.steps, "heun"), use_karras_sigmas=config.karras_sigmas,
        clip_sample=diffusion.clip_sample, clip_sample_range=diffusion.clip_range,
        timestep_spacing=config.timestep_spacing)
    return SchedulerSampler(scheduler, config.steps, name="heun", repeats_timesteps=True)


@ddpmkit.hookimpl
def register_samplers(register):
    register("heun", make, HeunConfig, "Heun's 2nd-order ODE solver (Karras et al. 2022): 2*steps-1 calls")
