"""Timestep sampler ``uniform``: t ~ Uniform({1..T}), Algorithm 1 line 3 (the default)."""

import torch

import ddpmkit


class UniformTimesteps:
    """``sample(batch, device, generator) -> (t, None)``: 0-based t in [0, T), no loss weights."""

    def __init__(self, *, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch: int, device, generator=None):
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator), None


@ddpmkit.hookimpl
def register_timestep_samplers(register):
    register("uniform", UniformTimesteps, None, "t uniform over 1..T (Algorithm 1 of Ho et al. 2020)")
