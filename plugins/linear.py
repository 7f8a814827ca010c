"""Schedule ``linear``: β_t evenly spaced from ``beta_start`` to ``beta_end`` (DDPM, seed Table 1)."""

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
class LinearConfig:
    """Options of ``linear``.

    timesteps: T, the number of diffusion steps (>= 1). Default 1000.
    beta_start: β_1, in (0, 1). Default 1e-4.
    beta_end: β_T, in (0, 1) and >= beta_start. Default 0.02.
    """

    timesteps: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    beta_start: float = attrs.field(default=1e-4, validator=_beta)
    beta_end: float = attrs.field(default=0.02, validator=[_beta, _order])


def linear_betas(config: LinearConfig) -> torch.Tensor:
    """β_1..β_T, shape ``(T,)``, float64."""
    return torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float64)


@ddpmkit.hookimpl
def register_schedules(register):
    register("linear", linear_betas, LinearConfig, "β linear from beta_start to beta_end (Ho et al. 2020)")
