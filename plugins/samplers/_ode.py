"""The loop shared by the ODE samplers of continuous processes (``euler``, and ``heun`` on them).

A continuous process (``process.continuous``) offers its probability-flow ODE: ``prior(shape)`` at
the first time of ``grid(steps)``, the network's inputs ``net_input(x, t)`` and ``net_time(t)``
(its noise level), and ``drift(output, x, t)`` = dx/dt from the network's output. From t_i to t_{i+1} (h = t_{i+1} − t_i):

    d_i = drift(net(x_i, t_i), x_i, t_i)
    Euler:  x_{i+1} = x_i + h·d_i                                               (1 call)
    Heun:   x̃ = x_i + h·d_i,  x_{i+1} = x_i + h·(d_i + drift(net(x̃, t_{i+1}), x̃, t_{i+1}))/2
            (2 calls; the last step, to t = 0, is Euler's: Karras et al. 2022, Algorithm 1)

This is a helper of the built-in plugins, not a plugin: it registers nothing.
"""

from __future__ import annotations

import torch


class ODESampler:
    """Euler or Heun steps on a continuous process's ODE.

    Args:
        process: the run's continuous process.
        steps: solver steps (the grid has steps + 1 times).
        heun: Heun's second-order correction (2·steps − 1 network calls) instead of Euler (steps calls).
    """

    uses_clip_sample = True  # the process's drift steps along the clipped x̂_0 when the run clips

    def __init__(self, process, steps: int, heun: bool = False):
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
