"""Sampler ``dpm-solver++``: DPM-Solver++ (Lu et al. 2022), multistep, 10–25 network calls.

With λ_t = log(α_t/σ_t) (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)), h = λ_t − λ_s and x̂_0 the network's data
prediction, the first-order update is

    x_t = (σ_t/σ_s) · x_s − α_t · (e^{−h} − 1) · x̂_0(x_s, s)                      (Lu et al. 2022, eq. 5)

and orders 2 and 3 add finite differences of earlier x̂_0's (multistep: one network call per step).
``sde-dpmsolver++`` is the stochastic variant (adds fresh noise each step). The update is diffusers'
``DPMSolverMultistepScheduler``, configured from the run's betas and prediction target.
"""

from __future__ import annotations

import attrs

import ddpmkit

from ._solver_loop import SPACINGS, SchedulerSampler, clip_kwargs, scheduler_kwargs


@attrs.define
class DPMSolverConfig:
    """Options of ``dpm-solver++``.

    steps: network calls, 1..T. Default 20.
    order: solver order, 1, 2 or 3. Default 2 (the recommended order with guidance).
    algorithm: ``dpmsolver++`` (deterministic, default) or ``sde-dpmsolver++`` (stochastic).
    lower_order_final: lower-order steps at the end, which stabilises fewer than 15 steps. Default True.
    karras_sigmas: Karras et al.'s σ spacing instead of ``timestep_spacing``. Default False.
    thresholding: dynamic thresholding of x̂_0 (Saharia et al. 2022): per image s = the
        ``dynamic_thresholding_ratio`` quantile of |x̂_0| clamped to [1, ``sample_max_value``], then
        x̂_0 → clamp(x̂_0, −s, s)/s. Default False. (With ``sample_max_value`` 1 it is clipping to
        [−1, 1], which ``--clip`` gives every sampler.)
    dynamic_thresholding_ratio: that quantile, in (0, 1]. Default 0.995.
    sample_max_value: the largest s, >= 1. Default 1.0 (diffusers' default).
    timestep_spacing: ``linspace`` (default), ``leading`` or ``trailing``.
    """

    steps: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    order: int = attrs.field(default=2, validator=attrs.validators.in_((1, 2, 3)))
    algorithm: str = attrs.field(default="dpmsolver++", validator=attrs.validators.in_(("dpmsolver++", "sde-dpmsolver++")))
    lower_order_final: bool = True
    karras_sigmas: bool = False
    thresholding: bool = False
    dynamic_thresholding_ratio: float = attrs.field(default=0.995, validator=[attrs.validators.gt(0.0),
                                                                           attrs.validators.le(1.0)])
    sample_max_value: float = attrs.field(default=1.0, validator=attrs.validators.ge(1.0))
    timestep_spacing: str = attrs.field(default="linspace", validator=attrs.validators.in_(SPACINGS))


def make(config: DPMSolverConfig, *, diffusion: ddpmkit.GaussianDiffusion) -> SchedulerSampler:
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        **scheduler_kwargs(diffusion, config.steps, "dpm-solver++"), solver_order=config.order,
        algorithm_type=config.algorithm, lower_order_final=config.lower_order_final,
        use_karras_sigmas=config.karras_sigmas, thresholding=config.thresholding,
        dynamic_thresholding_ratio=config.dynamic_thresholding_ratio, sample_max_value=config.sample_max_value,
        timestep_spacing=config.timestep_spacing)
    return SchedulerSampler(scheduler, config.steps, **clip_kwargs(diffusion), stochastic=config.algorithm.startswith("sde"),
                            name="dpm-solver++")


@ddpmkit.hookimpl
def register_samplers(register):
    register("dpm-solver++", make, DPMSolverConfig, "DPM-Solver++ (Lu et al. 2022): multistep, order 1-3, 10-25 calls")
