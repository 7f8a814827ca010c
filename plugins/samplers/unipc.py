"""Sampler ``unipc``: UniPC (Zhao et al. 2023), a unified predictor–corrector, 5–20 network calls.

Each step predicts x_t with the multistep UniP update of the chosen order (a DPM-Solver-like
exponential integrator on λ_t = log(α_t/σ_t)) and then corrects the previous step with UniC, which
reuses the network call just made — a higher order at no extra call. ``bh1`` and ``bh2`` are the
paper's two choices of B(h) (bh1 for unconditional sampling at very few steps, bh2 otherwise). The
update is diffusers' ``UniPCMultistepScheduler``, configured from the run's betas and target.
"""

from __future__ import annotations

import attrs

import ddpmkit

from ._solver_loop import SPACINGS, SchedulerSampler, ThresholdingOptions, clip_kwargs, scheduler_kwargs, thresholding_kwargs


@attrs.define
class UniPCConfig(ThresholdingOptions):
    """Options of ``unipc``.

    steps: network calls, 1..T. Default 20.
    order: order of the predictor, 1, 2 or 3. Default 2.
    solver_type: ``bh1`` or ``bh2`` (default). With ``bh1`` the last step ends at σ_min, not σ = 0
        (diffusers' bh1 update divides by an infinite λ at σ = 0 and returns NaN).
    lower_order_final: lower-order steps at the end. Default True.
    karras_sigmas: Karras et al.'s σ spacing instead of ``timestep_spacing``. Default False.
    thresholding, dynamic_thresholding_ratio, sample_max_value: see ``ThresholdingOptions``.
    timestep_spacing: ``linspace`` (default), ``leading`` or ``trailing``.
    """

    steps: int = attrs.field(default=20, validator=attrs.validators.ge(1))
    order: int = attrs.field(default=2, validator=attrs.validators.in_((1, 2, 3)))
    solver_type: str = attrs.field(default="bh2", validator=attrs.validators.in_(("bh1", "bh2")))
    lower_order_final: bool = True
    karras_sigmas: bool = False
    timestep_spacing: str = attrs.field(default="linspace", validator=attrs.validators.in_(SPACINGS))


def make(config: UniPCConfig, *, diffusion: ddpmkit.GaussianDiffusion) -> SchedulerSampler:
    from diffusers import UniPCMultistepScheduler

    if not config.lower_order_final and config.order >= 2 and (config.solver_type == "bh2"
                                                                or (config.order == 3 and config.karras_sigmas)):
        # Its last step, to σ = 0, is then of order 2-3: bh2 divides by λ = ∞ there (NaN samples) and
        # order 3 solves a singular system (bh1 with Karras σ: NaN); diffusers fails the same way.
        raise ddpmkit.DdpmkitError(
            f"unipc: lower_order_final=false with order {config.order}, solver_type {config.solver_type}"
            + (" and karras_sigmas" if config.karras_sigmas and config.solver_type == "bh1" else "")
            + " cannot take the last step to σ = 0 (NaN or a singular system); keep lower_order_final=true "
            "(the default), or use solver_type=bh1" + (" without karras_sigmas" if config.order == 3 else ""))

    scheduler = UniPCMultistepScheduler(
        **scheduler_kwargs(diffusion, config.steps, "unipc"), solver_order=config.order,
        solver_type=config.solver_type, lower_order_final=config.lower_order_final,
        use_karras_sigmas=config.karras_sigmas, **thresholding_kwargs(config),
        timestep_spacing=config.timestep_spacing,
        final_sigmas_type="sigma_min" if config.solver_type == "bh1" else "zero")
    return SchedulerSampler(scheduler, config.steps, **clip_kwargs(diffusion), name="unipc")


@ddpmkit.hookimpl
def register_samplers(register):
    register("unipc", make, UniPCConfig, "UniPC (Zhao et al. 2023): multistep predictor-corrector, order 1-3")
