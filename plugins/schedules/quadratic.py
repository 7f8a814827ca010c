"""Schedule ``quadratic``: β_t = (linspace(√β_start, √β_end, T))² — diffusers' ``scaled_linear``."""

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.validators import not_below, open_unit


@attrs.define
class QuadraticConfig:
    """Options of ``quadratic``: timesteps T (default 1000), beta_start (1e-4), beta_end (0.02)."""

    timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    beta_start: float = attrs.field(default=1e-4, validator=open_unit)
    beta_end: float = attrs.field(default=0.02, validator=[open_unit, not_below("beta_start")])


def quadratic_betas(config: QuadraticConfig) -> torch.Tensor:
    return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.timesteps, dtype=torch.float64) ** 2


@ddpmkit.hookimpl
def register_schedules(register):
    register("quadratic", quadratic_betas, QuadraticConfig, "β quadratic in t (√β linear), diffusers' scaled_linear")
