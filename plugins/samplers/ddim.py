"""Sampler ``ddim``: denoising diffusion implicit models (Song et al. 2021), any number of steps ≤ T.

On a sub-sequence τ of the training timesteps, with x̂_0 and ε̂ from the network:

    σ_τi = η · √((1 − ᾱ_prev)/(1 − ᾱ_τi)) · √(1 − ᾱ_τi/ᾱ_prev)                (Song et al. eq. 16)
    x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev − σ²) · ε̂ + σ · z                     (Song et al. eq. 12)

η = 0 is deterministic DDIM; η = 1 is DDPM-like. ᾱ_prev = 1 after the last step.

When the run clips x̂_0, ε̂ is re-derived from the clipped x̂_0 (``clipped_epsilon``, default on):

    ε̂ = (x_t − √ᾱ_τi · x̂_0) / √(1 − ᾱ_τi)                                          (DDPM eq. 4 solved for ε)

so that eq. (12) moves along the line through the clipped x̂_0, as guided-diffusion's DDIM does
(diffusers: ``DDIMScheduler.step(..., use_clipped_model_output=True)``). Without it, a guided ε̂
(classifier-free guidance, W > 1) disagrees with the clipped x̂_0 and pushes samples off their class.
Timesteps follow diffusers' ``DDIMScheduler`` spacings (``leading``, ``trailing``, ``linspace``).
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch

import ddpmkit


@attrs.define
class DDIMConfig:
    """Options of ``ddim``.

    steps: network evaluations, 1..T. Default 50.
    eta: η, the stochasticity, >= 0 (0: deterministic). Default 0.0.
    timestep_spacing: ``leading`` (DDIM paper, default), ``trailing`` or ``linspace``.
    clipped_epsilon: when the run clips x̂_0, re-derive ε̂ from the clipped x̂_0. Default True
        (False: diffusers' ``DDIMScheduler`` default, which keeps the network's ε̂).
    """

    steps: int = attrs.field(default=50, validator=attrs.validators.ge(1))
    eta: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    timestep_spacing: str = attrs.field(default="leading",
                                        validator=attrs.validators.in_(("leading", "trailing", "linspace")))
    clipped_epsilon: bool = attrs.field(default=True)


def ddim_timesteps(T: int, steps: int, spacing: str) -> list[int]:
    """The 0-based timesteps visited, from noisiest to cleanest."""
    if spacing == "leading":
        ts = np.arange(0, steps) * (T // steps)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[::-1] - 1
    else:
        ts = np.linspace(0, T - 1, steps).round()
    return [int(t) for t in ts[::-1]]


class DDIMSampler:
    uses_clip_sample = True  # the run's clipping of x̂_0 (GaussianDiffusion.eps_and_x0)

    def __init__(self, config: DDIMConfig, *, diffusion: ddpmkit.GaussianDiffusion):
        T = diffusion.num_timesteps
        if config.steps > T:
            raise ddpmkit.DdpmkitError(f"ddim: --steps {config.steps} is more than the model's T = {T}")
        self.config, self.diffusion = config, diffusion
        self.timesteps = ddim_timesteps(T, config.steps, config.timestep_spacing)
        self.num_steps = len(self.timesteps)
        self.stride = T // config.steps  # as diffusers: prev = t − T // steps

    def step(self, output: torch.Tensor, t: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        d, eta = self.diffusion, self.config.eta
        ac = d.alphas_cumprod
        prev = t - self.stride
        a_t = ac[t].item()
        a_prev = ac[prev].item() if prev >= 0 else 1.0
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps, x0 = d.eps_and_x0(output, x, tt)                                          # x̂_0, ε̂ (x̂_0 clipped if on)
        if d.clip_sample and self.config.clipped_epsilon:
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)                          # ε̂ from the clipped x̂_0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))          # eq. (16)
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma**2)) * eps   # eq. (12)
        if eta > 0 and noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev

    @torch.inference_mode()
    def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32):
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)        # x_T ~ N(0, I)
        tb = torch.empty(shape[0], dtype=torch.long, device=device)
        for k, t in enumerate(self.timesteps):
            out = model(x, tb.fill_(t))
            z = torch.randn(shape, generator=generator, device=device, dtype=dtype) if self.config.eta > 0 else None
            x = self.step(out, t, x, z)
            if progress is not None:
                progress(k + 1)
        return x


@ddpmkit.hookimpl
def register_samplers(register):
    register("ddim", DDIMSampler, DDIMConfig, "DDIM (Song et al. 2021): η, any number of steps ≤ T")
