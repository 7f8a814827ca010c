"""Process ``vp``: DDPM's discrete variance-preserving process (Ho et al. 2020), the default.

    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I),  t = 1..T,  ᾱ_t = ∏_{s ≤ t} (1 − β_s)

with the run's schedule plugin's betas. The math is the core's :class:`ddpmkit.GaussianDiffusion`
(``ddpmkit/diffusion.py``, each equation beside its code); this plugin only builds it, exactly as
ddpmkit did before processes were a kind, so a ``vp`` run is bit for bit what it was.
"""

from __future__ import annotations

import torch

import ddpmkit


def make(config: None = None, *, betas: torch.Tensor, variance_type: str = "fixed_small", clip_sample: bool = False,
         prediction: str = "epsilon") -> ddpmkit.GaussianDiffusion:
    return ddpmkit.GaussianDiffusion(betas, variance_type=variance_type, clip_sample=clip_sample, prediction=prediction)


@ddpmkit.hookimpl
def register_processes(register):
    register("vp", make, None, "DDPM's discrete variance-preserving process (Ho et al. 2020): T steps of the schedule")
