"""Schedule ``cosine`` (Nichol & Dhariwal 2021):

    ᾱ(t) = f(t)/f(0),  f(t) = cos²(((t/T) + s)/(1 + s) · π/2),
    β_t = min(1 − ᾱ(t)/ᾱ(t − 1), max_beta)

with s = 0.008 and β clipped at 0.999 — diffusers' ``squaredcos_cap_v2``.
"""

import attrs
import torch

import ddpmkit


@attrs.define
class CosineConfig:
    """Options of ``cosine``.

    timesteps: T (>= 1). Default 1000.
    s: the offset s that keeps β_1 from being too small (>= 0). Default 0.008.
    max_beta: clip for β near t = T, in (0, 1). Default 0.999.
    """

    timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    s: float = attrs.field(default=0.008, validator=attrs.validators.ge(0.0))
    max_beta: float = attrs.field(default=0.999, validator=[attrs.validators.gt(0.0), attrs.validators.lt(1.0)])


def cosine_betas(config: CosineConfig) -> torch.Tensor:
    T, s = config.timesteps, config.s
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * torch.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=config.max_beta)


@ddpmkit.hookimpl
def register_schedules(register):
    register("cosine", cosine_betas, CosineConfig, "cosine ᾱ (Nichol & Dhariwal 2021), β ≤ 0.999")
