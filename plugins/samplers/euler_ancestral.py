"""Sampler ``euler-ancestral``: Euler steps with ancestral noise (k-diffusion's ``sample_euler_ancestral``).

In σ = √((1 − ᾱ)/ᾱ), from σ_i to σ_{i+1}, the step splits σ_{i+1} into a deterministic part σ_down
and fresh noise σ_up (σ_down² + σ_up² = σ_{i+1}²):

    σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²),    σ_down = √(σ_{i+1}² − σ_up²)
    x_{i+1} = x_i + (σ_down − σ_i) · (x_i − x̂_0(x_i, σ_i))/σ_i + σ_up · z,   z ~ N(0, I)

one network call per step. ε and v prediction (diffusers' scheduler has no x0 prediction here). The
update is diffusers' ``EulerAncestralDiscreteScheduler``, configured from the run's betas and target.
"""

from __future__ import annotations

import attrs

import ddpmkit

from ._solver_loop import SPACINGS, SchedulerSampler, clip_kwargs, scheduler_kwargs


@attrs.define
class EulerAncestralConfig:
    """Options of ``euler-ancestral``.

    steps: network calls, 1..T. Default 25.
    timestep_spacing: ``linspace`` (default), ``leading`` or ``trailing``.
    """

    steps: int = attrs.field(default=25, validator=attrs.validators.ge(1))
    timestep_spacing: str = attrs.field(default="linspace", validator=attrs.validators.in_(SPACINGS))


def make(config: EulerAncestralConfig, *, diffusion: ddpmkit.GaussianDiffusion) -> SchedulerSampler:
    from diffusers import EulerAncestralDiscreteScheduler

    if diffusion.prediction == "x0":
        raise ddpmkit.DdpmkitError("euler-ancestral: x0 prediction is not supported (diffusers' scheduler takes "
                                   "epsilon or v); use dpm-solver++, unipc or heun")
    scheduler = EulerAncestralDiscreteScheduler(**scheduler_kwargs(diffusion, config.steps, "euler-ancestral"),
                                                timestep_spacing=config.timestep_spacing)
    return SchedulerSampler(scheduler, config.steps, **clip_kwargs(diffusion), stochastic=True, name="euler-ancestral")


@ddpmkit.hookimpl
def register_samplers(register):
    register("euler-ancestral", make, EulerAncestralConfig, "Euler ancestral (k-diffusion): stochastic, 1 call per step")
