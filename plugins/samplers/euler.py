"""Sampler ``euler``: Euler's method on a continuous process's probability-flow ODE, one network
call per step, from the prior at the first time of the process's grid to t = 0:

    x_{i+1} = x_i + (t_{i+1} − t_i)·dx/dt(x_i, t_i)

(for ``flow``, dx/dt is the velocity v̂; the same step as diffusers' ``FlowMatchEulerDiscreteScheduler``;
on ``vp``, the ODE in x̃ = x_t/√ᾱ_t over training timesteps, which is DDIM with η = 0). The loop is
``ddpmkit.sdk.ode``.
"""

from __future__ import annotations

import attrs

import ddpmkit
from ddpmkit.sdk.ode import ODESampler


@attrs.define
class EulerConfig:
    """Options of ``euler``.

    steps: steps = network calls, >= 1. Default 20.
    """

    steps: int = attrs.field(default=20, validator=attrs.validators.ge(1))


def make(config: EulerConfig, *, diffusion) -> ODESampler:
    return ODESampler(diffusion, config.steps)


make.processes = ("vp", "ode")  # vp through its ODE view (VPODE: DDIM with η = 0), and any continuous process


@ddpmkit.hookimpl
def register_samplers(register):
    register("euler", make, EulerConfig, "Euler steps on the process's ODE (vp: DDIM eta=0; flow, edm): 1 call per step")
