"""Process ``flow``: flow matching with the linear interpolant (rectified flow; Lipman et al. 2023,
Liu et al. 2023), in continuous time t ∈ [0, 1]:

    x_t = (1 − t)·x_0 + t·ε,   ε ~ N(0, I)                 the interpolant (t = 1 is the prior N(0, I))
    v = dx_t/dt = ε − x_0                                  the network's target, the velocity
    L = loss(v_θ(x_t, t), ε − x_0),  t ~ p(t)               training (the run's loss plugin)
    dx/dt = v_θ(x, t), integrated from t = 1 to t = 0      the probability-flow ODE (samplers)

p(t) is uniform on (0, 1) or logit-normal, t = sigmoid(loc + scale·n), n ~ N(0, 1) (Esser et al.
2024, Stable Diffusion 3). The network gets t scaled by ``time_scale`` (default 1000) as a float,
the range its sinusoidal embedding was made for. From an output v̂ at (x_t, t):

    x̂_0 = x_t − t·v̂,   ε̂ = x_t + (1 − t)·v̂

With the run's clipping on, the ODE steps along the clipped x̂_0: v̂' = (x_t − clip(x̂_0))/t.
"""

from __future__ import annotations

import math

import attrs
import torch

import ddpmkit
from ddpmkit.diffusion import LossTerms

TIMES = ("uniform", "logit-normal")


@attrs.define
class FlowConfig:
    """Options of ``flow``.

    time: how training draws t: ``uniform`` (default) or ``logit-normal``.
    loc, scale: the logit-normal's mean and standard deviation in logit space. Defaults 0.0, 1.0.
    time_scale: the network gets t × time_scale. Default 1000.
    """

    time: str = attrs.field(default="uniform", validator=attrs.validators.in_(TIMES))
    loc: float = 0.0
    scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    time_scale: float = attrs.field(default=1000.0, validator=attrs.validators.gt(0.0))


class FlowProcess:
    """The linear-interpolant flow (see the module doc). Continuous time: samplers that serve ``ode``
    processes (``euler``, ``heun``) integrate :meth:`drift` over :meth:`grid`."""

    name = "flow"
    continuous = True
    ode_starts_at_zero = True  # the velocity is defined at t = 0: the likelihood integrates from the data itself
    prediction = "velocity"
    variance_type = "fixed"
    num_timesteps = 1000  # the grid a picture of the forward process (forward.png) is drawn on

    def __init__(self, config: FlowConfig, clip_sample: bool = False, clip_range: float = 1.0):
        self.config, self.clip_sample, self.clip_range = config, clip_sample, clip_range

    # -- training ---------------------------------------------------------
    def draw_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training times in (0, 1), float32."""
        if self.config.time == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(self.config.loc + self.config.scale * torch.randn(n, device=device, generator=generator))

    def _time(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """t as a float broadcastable over x; an integer t is an index of the 1000-point display grid."""
        if not t.is_floating_point():
            t = (t.double() + 1) / self.num_timesteps
        return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t)·x_0 + t·ε."""
        tt = self._time(t, x0)
        return (1 - tt) * x0 + tt * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """v = ε − x_0."""
        return noise - x0

    def net_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network gets as its image input: x_t itself."""
        return x

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network gets as its noise level: t × time_scale, float32."""
        return (t * self.config.time_scale).float()

    def loss_terms(self, model, x0: torch.Tensor, loss_fn, generator: torch.Generator | None = None,
                   min_snr_gamma: float | None = None, global_batch: int | None = None, offset: int = 0,
                   timestep_sampler=None, conditions: dict | None = None, per_sample: bool = False,
                   loss_context: bool = False) -> LossTerms:
        """One draw of the flow-matching objective (arguments as :meth:`ddpmkit.GaussianDiffusion.loss_terms`;
        the run's timestep sampler, min-SNR weighting and loss context are for ``vp`` and refused
        when the run is assembled)."""
        b = x0.shape[0]
        g = global_batch or b
        t = self.draw_t(g, x0.device, generator)
        eps = torch.randn((g, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, generator=generator)
        if g != b:
            t, eps = t[offset: offset + b], eps[offset: offset + b]
        xt = self.q_sample(x0, t, eps)
        output = model(xt, self.net_time(t), **(conditions or {}))
        target = self.target(x0, eps)
        if not per_sample:
            return LossTerms(loss_fn(output, target), None, t)
        losses = loss_fn(output, target, reduction="none").reshape(b, -1).mean(dim=1)
        return LossTerms(losses.mean(), losses.detach(), t)

    # -- sampling: the probability-flow ODE ---------------------------------
    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x at t = 1: N(0, I)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, I) per image (float64)."""
        d = x[0].numel()
        return -0.5 * (x.double().flatten(1) ** 2).sum(1) - d * 0.5 * math.log(2 * math.pi)

    def grid(self, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """steps + 1 times from 1 to 0, evenly spaced (float64)."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)

    def eps_and_x0(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂_0) from the velocity v̂; x̂_0 clipped when clipping is on."""
        tt = self._time(t, xt)
        x0 = xt - tt * output
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return xt + (1 - tt) * output, x0

    def drift(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dx/dt at (x, t) from the network's output: v̂, or with clipping the v̂ of the clipped x̂_0."""
        if not self.clip_sample:
            return output
        tt = self._time(t, x)
        x0 = (x - tt * output).clamp(-self.clip_range, self.clip_range)
        return (x - x0) / tt


def make(config: FlowConfig, *, clip_sample: bool = False, prediction: str = "epsilon",
         variance_type: str = "fixed_small") -> FlowProcess:
    if prediction != "epsilon":
        raise ddpmkit.DdpmkitError(f"process 'flow' predicts the velocity ε − x_0; --prediction {prediction} is for "
                                   "the vp process (drop it, or use --process vp)")
    if variance_type == "learned_range":
        raise ddpmkit.DdpmkitError("process 'flow' has no learned variance (an ODE has none); drop --learn-variance / "
                                   "--variance learned_range, or use --process vp")
    return FlowProcess(config, clip_sample=clip_sample)


@ddpmkit.hookimpl
def register_processes(register):
    register("flow", make, FlowConfig, "flow matching, linear interpolant (rectified flow): continuous t, velocity target")
