"""Schedule ``quadratic``: β_t = (linspace(√β_start, √β_end, T))² — diffusers' ``scaled_linear``."""

import attrs
import torch

import ddpmkit


def _beta(inst, attribute, value):
    if not 0 < value < 1:
        raise ValueError(f"{attribute.name} must lie in (0, 1), got {value}")


def _order(inst, attribute, value):
    if inst.beta_start > value:
        raise ValueError(f"beta_start ({inst.beta_start}) must not exceed beta_end ({value})")


@attrs.define
class QuadraticConfig:
    """Options of ``quadratic``: timesteps T (default 1000), beta_start (1e-4), beta_end (0.02)."""

    timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    beta_start: float = attrs.field(default=1e-4, validator=_beta)
    beta_end: float = attrs.field(default=0.02, validator=[_beta, _order])


def quadratic_betas(config: QuadraticConfig) -> torch.Tensor:
    return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.timesteps, dtype=torch.float64) ** 2


@ddpmkit.hookimpl
def register_schedules(register):
    register("quadratic", quadratic_betas, QuadraticConfig, "β quadratic in t (√β linear), diffusers' scaled_linear")
