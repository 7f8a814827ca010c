"""Schedule ``linear``: β_t evenly spaced from ``beta_start`` to ``beta_end`` (DDPM, seed Table 1)."""

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.validators import not_below, open_unit


@attrs.define
class LinearConfig:
    """Options of ``linear``.

    timesteps: T, the number of diffusion steps (>= 1). Default 1000.
    beta_start: β_1, in (0, 1). Default 1e-4.
    beta_end: β_T, in (0, 1) and >= beta_start. Default 0.02.
    """

    timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    beta_start: float = attrs.field(default=1e-4, validator=open_unit)
    beta_end: float = attrs.field(default=0.02, validator=[open_unit, not_below("beta_start")])


def linear_betas(config: LinearConfig) -> torch.Tensor:
    """β_1..β_T, shape ``(T,)``, float64."""
    return torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float64)


@ddpmkit.hookimpl
def register_schedules(register):
    register("linear", linear_betas, LinearConfig, "β linear from beta_start to beta_end (Ho et al. 2020)")
