"""The probability-flow ODE of a process, for samplers and metrics: the loop of the ODE samplers
(``euler``, ``heun`` on continuous processes, ``edm-sde``'s deterministic part) and the likelihood.

A continuous process (``process.continuous``) offers its probability-flow ODE: ``prior(shape)`` at
the first time of ``grid(steps)``, the network's inputs ``net_input(x, t)`` and ``net_time(t)``
(its noise level), and ``drift(output, x, t)`` = dx/dt from the network's output. From t_i to t_{i+1} (h = t_{i+1} − t_i):

    d_i = drift(net(x_i, t_i), x_i, t_i)
    Euler:  x_{i+1} = x_i + h·d_i                                               (1 call)
    Heun:   x̃ = x_i + h·d_i,  x_{i+1} = x_i + h·(d_i + drift(net(x̃, t_{i+1}), x̃, t_{i+1}))/2
            (2 calls; the last step, to t = 0, is Euler's: Karras et al. 2022, Algorithm 1)

DDPM's process (``vp``, a ``GaussianDiffusion``) is seen as an ODE through :class:`VPODE`
(:func:`ode_view` gives the ODE of any process). :func:`log_likelihood` integrates the ODE from the
data to the prior with the divergence of its drift (the instantaneous change of variables, Chen et
al. 2018; Song et al. 2021, Appendix D.2):

    log p_0(x_0) = log p_T(x_T) + ∫_0^T ∇·f(x_t, t) dt,    f = dx/dt

the divergence exact (D vector–Jacobian products) or Hutchinson's estimate E_v[vᵀ(∂f/∂x)v] with
Rademacher v, on Heun steps (the same trapezoid for the divergence).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.errors import DdpmkitError


class VPODE:
    """DDPM's discrete process as an ODE, in x̃ = x_t/√ᾱ_t = x_0 + σ_t·ε with σ_t = √((1 − ᾱ_t)/ᾱ_t)
    (Karras et al. 2022, Table 1, "VP"): dx̃/dσ = (x̃ − x̂_0)/σ. Its times are training timesteps,
    t_i = round(T − i·T/steps) − 1 (trailing spacing, starting at T − 1), then σ = 0, so the network
    gets the integer t it was trained on; Euler's method on them is DDIM with η = 0 (Song et al. 2021),
    step for step. x̂_0 is the run's, whatever it predicts (clipped when the run clips)."""

    name = "vp"
    continuous = True

    def __init__(self, diffusion: GaussianDiffusion):
        self.diffusion = diffusion
        ac = diffusion.alphas_cumprod.double()
        self.sigmas = ((1 - ac) / ac).sqrt()

    def timesteps(self, steps: int) -> list[int]:
        T = self.diffusion.num_timesteps
        if steps > T:
            raise DdpmkitError(f"--steps {steps} is more than the model's T = {T}")
        return sorted({int(round(T - i * T / steps)) - 1 for i in range(steps)}, reverse=True)

    def grid(self, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        ts = self.timesteps(steps)
        return torch.cat([self.sigmas[ts], self.sigmas.new_zeros(1)]).to(device)

    def likelihood_grid(self, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """σ's for the likelihood, descending: training timesteps spaced evenly in log σ from t = T − 1
        down to t = 0, always ending at t = 0 (σ_1 = √(β_1/(1 − β_1))), so that more steps refine one
        integral rather than moving its start. (The sampling grid's trailing spacing starts near
        t = T/steps; the dequantized data would be read as if it carried that σ of noise.)"""
        T = self.diffusion.num_timesteps
        if steps > T - 1:
            raise DdpmkitError(f"--steps {steps} is more than the model's T − 1 = {T - 1}")
        want = torch.linspace(math.log(self.sigmas[0]), math.log(self.sigmas[-1]), steps + 1, dtype=torch.float64)
        idx: list[int] = []
        for k, t in enumerate(self._t(want.exp()).tolist()):  # distinct: nudge up where rounding collides
            idx.append(min(max(t, idx[-1] + 1 if idx else 0), T - 1 - (steps - k)))
        return self.sigmas[idx[::-1]].to(device)

    def _t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep of each σ on the table (the grid's σ's are on it)."""
        return (self.sigmas.to(sigma.device).view(1, -1) - sigma.double().view(-1, 1)).abs().argmin(dim=1)

    def prior_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x̃; 0, (1 + σ_max²)·I) per image (x̃ at t = T − 1, x_0's share of it neglected)."""
        return _gaussian_log_density(x, math.sqrt(1 + float(self.sigmas[-1]) ** 2))

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x̃ at t = T − 1: x_T/√ᾱ_T with x_T ~ N(0, I)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * math.sqrt(
            1 + float(self.sigmas[-1]) ** 2)

    def q_sample(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x̃ = x_0 + σ·ε: a training image noised to ODE time σ (eq. 4 divided by √ᾱ_t)."""
        return x0 + sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))) * noise

    def net_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x̃ = x̃/√(σ² + 1)."""
        return x / (sigma.to(x.dtype) ** 2 + 1).sqrt().view(-1, *([1] * (x.ndim - 1)))

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return self._t(sigma)

    def drift(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(x̃ − x̂_0)/σ, x̂_0 from the network's output at x_t."""
        t = self._t(sigma)
        _, x0 = self.diffusion.eps_and_x0(output, self.net_input(x, sigma), t)
        return (x - x0) / sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _gaussian_log_density(x: torch.Tensor, std: float) -> torch.Tensor:
    d = x[0].numel()
    return -0.5 * (x.double().flatten(1) ** 2).sum(1) / std ** 2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


def ode_view(process: Any) -> Any:
    """The process's probability-flow ODE: a continuous process itself, a GaussianDiffusion as :class:`VPODE`."""
    if isinstance(process, GaussianDiffusion):
        return VPODE(process)
    if not getattr(process, "continuous", False):
        raise DdpmkitError(f"process '{getattr(process, 'name', type(process).__name__)}' offers no ODE")
    return process


def counted_drift(process: Any, model: Callable[..., torch.Tensor], shape: tuple[int, ...],
                  device: torch.device | str = "cpu",
                  progress: Callable[[int], None] | None = None) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``drift(x, t)``: dx/dt of ``process``'s ODE from one call of the network at (x, t), t the same
    for the batch; ``progress(k)`` after the k-th call. A learned variance in the output is set aside."""
    calls = 0

    def drift(x: torch.Tensor, t: Any) -> torch.Tensor:
        nonlocal calls
        tb = torch.full((shape[0],), float(t), device=device, dtype=torch.float64)
        out = model(process.net_input(x, tb), process.net_time(tb))
        calls += 1
        if progress is not None:
            progress(calls)
        return process.drift(out[:, :shape[1]], x, tb)

    return drift


class ODESampler:
    """Euler or Heun steps on a continuous process's ODE.

    Args:
        process: the run's continuous process.
        steps: solver steps (the grid has steps + 1 times).
        heun: Heun's second-order correction (2·steps − 1 network calls) instead of Euler (steps calls).
    """

    uses_clip_sample = True  # the process's drift steps along the clipped x̂_0 when the run clips

    def __init__(self, process: Any, steps: int, heun: bool = False):
        process = ode_view(process)
        if isinstance(process, VPODE):
            steps = len(process.timesteps(steps))
        self.process, self.steps, self.heun = process, steps, heun
        self.num_steps = 2 * steps - 1 if heun else steps

    @torch.inference_mode()
    def sample(self, model: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        p = self.process
        ts = p.grid(self.steps, device)
        x = p.prior(shape, generator=generator, device=device, dtype=dtype)
        drift = counted_drift(p, model, shape, device, progress)

        for i in range(self.steps):
            t, t_next = ts[i], ts[i + 1]
            h = float(t_next - t)
            d = drift(x, t)
            x_next = x + h * d
            if self.heun and float(t_next) > 0:
                x_next = x + h * (d + drift(x_next, t_next)) / 2
            x = x_next
        return x.to(dtype)


def log_likelihood(process: Any, model: Callable[..., torch.Tensor], x: torch.Tensor, steps: int = 64,
                   exact: bool = False, probes: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x) per image (nats, float64) under the process's probability-flow ODE with the network
    ``model(input, noise_level)``, integrated with ``steps`` Heun steps from the data up the
    process's grid (from t = 0 where its drift is defined there, ``ode_starts_at_zero``; else from
    its smallest positive time, whose noise is neglected) to the prior. ``exact``: the divergence from
    D vector–Jacobian products per evaluation; else Hutchinson's with ``probes`` Rademacher vectors.
    The run's clipping of x̂_0 is left out: the likelihood is the network's own ODE's."""
    if getattr(process, "clip_sample", False):  # the likelihood is the model's own ODE: no clipping of x̂_0
        process = copy.copy(process)
        process.clip_sample = False
    view = ode_view(process)
    if hasattr(view, "likelihood_grid"):  # a grid of its own for the likelihood (vp: from t = 0, even in log σ)
        ts = view.likelihood_grid(steps, x.device).flip(0)
    else:
        ts = view.grid(steps, x.device).flip(0)
        if float(ts[0]) == 0.0 and not getattr(view, "ode_starts_at_zero", False):
            ts = ts[1:]
    b = x.shape[0]

    def f_div(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tb = torch.full((b,), float(t), device=x.device, dtype=torch.float64)
        with torch.inference_mode(False), torch.enable_grad():  # (evaluate runs metrics in inference mode)
            x = x.detach().clone().requires_grad_(True)
            f = view.drift(model(view.net_input(x, tb), view.net_time(tb))[:, :x.shape[1]], x, tb)
            flat = f.flatten(1)
            if exact:
                div = torch.zeros(b, dtype=torch.float64, device=x.device)
                for i in range(flat.shape[1]):
                    g = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
                    div += g.flatten(1)[:, i].double()
            else:
                div = torch.zeros(b, dtype=torch.float64, device=x.device)
                for _ in range(probes):
                    v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
                    g = torch.autograd.grad((f * v).sum(), x, retain_graph=True)[0]
                    div += (g * v).flatten(1).sum(1).double() / probes
        return f.detach(), div

    delta = torch.zeros(b, dtype=torch.float64, device=x.device)
    with torch.inference_mode(False):
        x, ts = x.clone(), ts.clone()
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        h = float(t_next - t)
        f1, d1 = f_div(x, t)
        x_pred = x + h * f1
        f2, d2 = f_div(x_pred, t_next)
        x = x + h * (f1 + f2) / 2
        delta += h * (d1 + d2) / 2
    return view.prior_log_density(x) + delta


def bits_per_dim(log_p: torch.Tensor, dims: int, levels: int = 256) -> torch.Tensor:
    """−log₂ P per dimension of 8-bit data from log p of uniformly dequantized images in [−1, 1]: each
    level a bin of width 2/(levels − 1), so −log P(k) ≤ −(log p(x̃) + D·log(2/(levels − 1)))."""
    return -(log_p + dims * math.log(2 / (levels - 1))) / (dims * math.log(2))
