"""Schedule ``geometric``: β_t = β_start · (β_end/β_start)^((t − 1)/(T − 1)), log-linear in t.

An example of a ddpmkit plugin published as its own package (see README.md beside this file).
"""

import attrs
import torch

import ddpmkit


def _beta(inst, attribute, value):
    if not 0 < value < 1:
        raise ValueError(f"{attribute.name} must lie in (0, 1), got {value}")


@attrs.define
class GeometricConfig:
    """timesteps: T (default 1000); beta_start: β_1 (1e-4); beta_end: β_T (0.02)."""

    timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    beta_start: float = attrs.field(default=1e-4, validator=_beta)
    beta_end: float = attrs.field(default=0.02, validator=_beta)


def geometric_betas(config: GeometricConfig) -> torch.Tensor:
    T = config.timesteps
    k = torch.arange(T, dtype=torch.float64) / max(1, T - 1)
    return config.beta_start * (config.beta_end / config.beta_start) ** k


@ddpmkit.hookimpl
def register_schedules(register):
    register("geometric", geometric_betas, GeometricConfig, "β log-linear from beta_start to beta_end")
