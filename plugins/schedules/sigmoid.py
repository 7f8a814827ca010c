"""Schedule ``sigmoid`` (GeoDiff, Xu et al. 2022): β_t = σ(linspace(−6, 6, T)) · (β_end − β_start) + β_start.

Equal to diffusers' ``sigmoid`` beta schedule.
"""

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.validators import not_below, open_unit


@attrs.define
class SigmoidConfig:
    """Options of ``sigmoid``: timesteps T (default 1000), beta_start (1e-4), beta_end (0.02),
    and the sigmoid's input range ±``span`` (default 6)."""

    timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    beta_start: float = attrs.field(default=1e-4, validator=open_unit)
    beta_end: float = attrs.field(default=0.02, validator=[open_unit, not_below("beta_start")])
    span: float = attrs.field(default=6.0, validator=attrs.validators.gt(0.0))


def sigmoid_betas(config: SigmoidConfig) -> torch.Tensor:
    x = torch.linspace(-config.span, config.span, config.timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (config.beta_end - config.beta_start) + config.beta_start


@ddpmkit.hookimpl
def register_schedules(register):
    register("sigmoid", sigmoid_betas, SigmoidConfig, "sigmoid-shaped β (GeoDiff), diffusers' sigmoid")
