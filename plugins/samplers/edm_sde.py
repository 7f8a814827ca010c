"""Sampler ``edm-sde``: EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) for the ``edm``
process. Each step first adds noise, raising σ_i to σ̂ = σ_i·(1 + γ_i), then takes a Heun step of the
ODE from σ̂ to σ_{i+1} (the last, to σ = 0, an Euler step): 2·steps − 1 network calls.

    γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ σ_i ≤ S_tmax else 0
    x̂ = x_i + √(σ̂² − σ_i²)·S_noise·z,   z ~ N(0, I)
    d = (x̂ − D(x̂; σ̂))/σ̂,   x_{i+1} = x̂ + (σ_{i+1} − σ̂)·d   (+ Heun's correction when σ_{i+1} > 0)

With S_churn = 0 it is the deterministic ``heun``, step for step.
"""

from __future__ import annotations

import math

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.ode import counted_drift


@attrs.define
class EDMSDEConfig:
    """Options of ``edm-sde`` (defaults: the paper's ImageNet-64 settings, Table 5).

    steps: N, the ρ-grid's σ's; network calls 2·steps − 1. Default 18.
    s_churn: the total extra noise. Default 40. s_tmin, s_tmax: the σ range that gets it. Defaults 0.05, 50.
    s_noise: the noise's scale (slightly above 1 offsets the denoiser's loss of detail). Default 1.003.
    """

    steps: int = attrs.field(default=18, validator=attrs.validators.ge(1))
    s_churn: float = attrs.field(default=40.0, validator=attrs.validators.ge(0.0))
    s_tmin: float = attrs.field(default=0.05, validator=attrs.validators.ge(0.0))
    s_tmax: float = attrs.field(default=50.0, validator=attrs.validators.ge(0.0))
    s_noise: float = attrs.field(default=1.003, validator=attrs.validators.gt(0.0))


class EDMSDESampler:
    uses_clip_sample = True  # D is clipped by the process when the run clips

    def __init__(self, config: EDMSDEConfig, process):
        self.config, self.process = config, process
        self.num_steps = 2 * config.steps - 1

    @torch.inference_mode()
    def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32):
        c, p = self.config, self.process
        sigmas = p.grid(c.steps, device)
        x = p.prior(shape, generator=generator, device=device, dtype=dtype)
        drift = counted_drift(p, model, shape, device, progress)

        for i in range(c.steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            gamma = min(c.s_churn / c.steps, math.sqrt(2) - 1) if c.s_tmin <= s <= c.s_tmax else 0.0
            s_hat = s * (1 + gamma)
            if gamma > 0:
                z = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
                x = x + math.sqrt(s_hat ** 2 - s ** 2) * c.s_noise * z
            d = drift(x, s_hat)
            x_next = x + (s_next - s_hat) * d
            if s_next > 0:
                x_next = x + (s_next - s_hat) * (d + drift(x_next, s_next)) / 2
            x = x_next
        return x.to(dtype)


def make(config: EDMSDEConfig, *, diffusion) -> EDMSDESampler:
    return EDMSDESampler(config, diffusion)


make.processes = ("edm",)  # x = x_0 + σ·ε: the churn adds noise in σ


@ddpmkit.hookimpl
def register_samplers(register):
    register("edm-sde", make, EDMSDEConfig, "EDM's stochastic sampler (Algorithm 2): churn, then Heun; 2*steps-1 calls")
