"""The loop shared by the ODE samplers of continuous processes (``euler``, and ``heun`` on them).

A continuous process (``process.continuous``) offers its probability-flow ODE: ``prior(shape)`` at
the first time of ``grid(steps)``, the network's inputs ``net_input(x, t)`` and ``net_time(t)``
(its noise level), and ``drift(output, x, t)`` = dx/dt from the network's output. From t_i to t_{i+1} (h = t_{i+1} − t_i):

    d_i = drift(net(x_i, t_i), x_i, t_i)
    Euler:  x_{i+1} = x_i + h·d_i                                               (1 call)
    Heun:   x̃ = x_i + h·d_i,  x_{i+1} = x_i + h·(d_i + drift(net(x̃, t_{i+1}), x̃, t_{i+1}))/2
            (2 calls; the last step, to t = 0, is Euler's: Karras et al. 2022, Algorithm 1)

DDPM's process (``vp``, a ``GaussianDiffusion``) is seen as an ODE through :class:`VPODE`.

This is a helper of the built-in plugins, not a plugin: it registers nothing.
"""

from __future__ import annotations

import math

import torch

import ddpmkit


class VPODE:
    """DDPM's discrete process as an ODE, in x̃ = x_t/√ᾱ_t = x_0 + σ_t·ε with σ_t = √((1 − ᾱ_t)/ᾱ_t)
    (Karras et al. 2022, Table 1, "VP"): dx̃/dσ = (x̃ − x̂_0)/σ. Its times are training timesteps,
    t_i = round(T − i·T/steps) − 1 (trailing spacing, starting at T − 1), then σ = 0, so the network
    gets the integer t it was trained on; Euler's method on them is DDIM with η = 0 (Song et al. 2021),
    step for step. x̂_0 is the run's, whatever it predicts (clipped when the run clips)."""

    name = "vp"
    continuous = True

    def __init__(self, diffusion: ddpmkit.GaussianDiffusion):
        self.diffusion = diffusion
        ac = diffusion.alphas_cumprod.double()
        self.sigmas = ((1 - ac) / ac).sqrt()

    def timesteps(self, steps: int) -> list[int]:
        T = self.diffusion.num_timesteps
        if steps > T:
            raise ddpmkit.DdpmkitError(f"--steps {steps} is more than the model's T = {T}")
        return sorted({int(round(T - i * T / steps)) - 1 for i in range(steps)}, reverse=True)

    def grid(self, steps: int, device="cpu") -> torch.Tensor:
        ts = self.timesteps(steps)
        return torch.cat([self.sigmas[ts], self.sigmas.new_zeros(1)]).to(device)

    def _t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep of each σ on the table (the grid's σ's are on it)."""
        return (self.sigmas.to(sigma.device).view(1, -1) - sigma.double().view(-1, 1)).abs().argmin(dim=1)

    def prior(self, shape, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """x̃ at t = T − 1: x_T/√ᾱ_T with x_T ~ N(0, I)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * math.sqrt(
            1 + float(self.sigmas[-1]) ** 2)

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


class ODESampler:
    """Euler or Heun steps on a continuous process's ODE.

    Args:
        process: the run's continuous process.
        steps: solver steps (the grid has steps + 1 times).
        heun: Heun's second-order correction (2·steps − 1 network calls) instead of Euler (steps calls).
    """

    uses_clip_sample = True  # the process's drift steps along the clipped x̂_0 when the run clips

    def __init__(self, process, steps: int, heun: bool = False):
        if isinstance(process, ddpmkit.GaussianDiffusion):
            process = VPODE(process)
            steps = len(process.timesteps(steps))
        self.process, self.steps, self.heun = process, steps, heun
        self.num_steps = 2 * steps - 1 if heun else steps

    @torch.inference_mode()
    def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32):
        p = self.process
        ts = p.grid(self.steps, device)
        x = p.prior(shape, generator=generator, device=device, dtype=dtype)
        calls = 0

        def drift(x, t):
            nonlocal calls
            tb = torch.full((shape[0],), float(t), device=device, dtype=torch.float64)
            out = model(p.net_input(x, tb), p.net_time(tb))
            calls += 1
            if progress is not None:
                progress(calls)
            return p.drift(out[:, :shape[1]], x, tb)

        for i in range(self.steps):
            t, t_next = ts[i], ts[i + 1]
            h = float(t_next - t)
            d = drift(x, t)
            x_next = x + h * d
            if self.heun and float(t_next) > 0:
                x_next = x + h * (d + drift(x_next, t_next)) / 2
            x = x_next
        return x.to(dtype)
