"""Sampler ``ddpm``: Algorithm 2 of the DDPM paper, T network evaluations (the default).

The math lives in the core (``GaussianDiffusion.sample``); this plugin exposes it as a sampler.
"""

import ddpmkit


class DDPMSampler:
    uses_learned_variance = True  # a learned_range model's σ_t (improved DDPM) is used at every step
    uses_clip_sample = True  # the run's clipping of x̂_0 (GaussianDiffusion.p_mean_variance)

    def __init__(self, config=None, *, diffusion: ddpmkit.GaussianDiffusion):
        self.diffusion = diffusion
        self.num_steps = diffusion.num_timesteps

    def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=None):
        import torch

        return self.diffusion.sample(model, shape, generator=generator, device=device, progress=progress,
                                     dtype=dtype or torch.float32)


@ddpmkit.hookimpl
def register_samplers(register):
    register("ddpm", DDPMSampler, None, "ancestral sampling, Algorithm 2 (Ho et al. 2020), T steps")
