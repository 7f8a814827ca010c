"""Process ``edm``: Karras et al. 2022 (EDM), variance exploding in σ with preconditioning.

    x_σ = x_0 + σ·ε,   ε ~ N(0, I),  σ ∈ [σ_min, σ_max]                          (the prior: N(0, σ_max²·I))
    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))                    (Table 1, preconditioning)
    c_skip = σ_d²/(σ² + σ_d²),  c_out = σ·σ_d/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),  c_noise = ln(σ)/4
    training: ln σ ~ N(P_mean, P_std²), loss(F, (x_0 − c_skip·x)/c_out)           (λ(σ)·c_out² = 1, eq. 8)
    sampling: dx/dσ = (x − D(x; σ))/σ on σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, σ_N = 0

The network F gets c_in·x and c_noise·``noise_scale`` (float). With the run's clipping on, D is
clipped to [−1, 1] before it enters the ODE. ``euler`` and ``heun`` (EDM's Algorithm 1) integrate the
ODE on the ρ-grid; ``edm-sde`` is its stochastic sampler (Algorithm 2).
"""

from __future__ import annotations

import math

import attrs
import torch

import ddpmkit
from ddpmkit.diffusion import LossTerms


@attrs.define
class EDMConfig:
    """Options of ``edm`` (the paper's defaults).

    sigma_data: σ_d, the data's standard deviation. Default 0.5.
    p_mean, p_std: training draws ln σ ~ N(p_mean, p_std²). Defaults −1.2, 1.2.
    sigma_min, sigma_max: the sampling range. Defaults 0.002, 80.
    rho: ρ of the sampling grid. Default 7.
    noise_scale: the network gets c_noise × noise_scale. Default 1.
    """

    sigma_data: float = attrs.field(default=0.5, validator=attrs.validators.gt(0.0))
    p_mean: float = -1.2
    p_std: float = attrs.field(default=1.2, validator=attrs.validators.gt(0.0))
    sigma_min: float = attrs.field(default=0.002, validator=attrs.validators.gt(0.0))
    sigma_max: float = attrs.field(default=80.0, validator=attrs.validators.gt(0.0))
    rho: float = attrs.field(default=7.0, validator=attrs.validators.gt(0.0))
    noise_scale: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))

    def __attrs_post_init__(self):
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")


class EDMProcess:
    """EDM's process (see the module doc); the time of its ODE is σ."""

    name = "edm"
    continuous = True
    prediction = "denoised"
    variance_type = "fixed"
    num_timesteps = 1000  # the grid forward.png is drawn on

    def __init__(self, config: EDMConfig, clip_sample: bool = False, clip_range: float = 1.0):
        self.config, self.clip_sample, self.clip_range = config, clip_sample, clip_range

    # -- preconditioning (Table 1) ------------------------------------------
    def _sigma(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """σ broadcastable over x; an integer t indexes the 1000-point ρ-grid (forward.png)."""
        if not t.is_floating_point():
            t = self.grid(self.num_timesteps, t.device).flip(0)[1:][t.long()]  # σ from small to large
        return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def c_skip(self, s: torch.Tensor) -> torch.Tensor:
        return self.config.sigma_data ** 2 / (s ** 2 + self.config.sigma_data ** 2)

    def c_out(self, s: torch.Tensor) -> torch.Tensor:
        return s * self.config.sigma_data / (s ** 2 + self.config.sigma_data ** 2).sqrt()

    def c_in(self, s: torch.Tensor) -> torch.Tensor:
        return 1 / (s ** 2 + self.config.sigma_data ** 2).sqrt()

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise = ln(σ)/4 (× noise_scale), float32."""
        return (sigma.log() / 4 * self.config.noise_scale).float()

    def net_input(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """c_in(σ)·x."""
        return x * self.c_in(self._sigma(sigma, x))

    def denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; σ) = c_skip·x + c_out·F, clipped when clipping is on."""
        s = self._sigma(sigma, x)
        d = self.c_skip(s) * x + self.c_out(s) * output
        return d.clamp(-self.clip_range, self.clip_range) if self.clip_sample else d

    # -- training (eq. 8) ------------------------------------------------------
    def draw_t(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training σ's: ln σ ~ N(P_mean, P_std²)."""
        return (self.config.p_mean + self.config.p_std * torch.randn(n, device=device, generator=generator)).exp()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x = x_0 + σ·ε."""
        return x0 + self._sigma(t, x0) * noise

    def loss_terms(self, model, x0: torch.Tensor, loss_fn, generator: torch.Generator | None = None,
                   min_snr_gamma: float | None = None, global_batch: int | None = None, offset: int = 0,
                   timestep_sampler=None, conditions: dict | None = None, per_sample: bool = False,
                   loss_context: bool = False) -> LossTerms:
        """One draw of EDM's objective (arguments as :meth:`ddpmkit.GaussianDiffusion.loss_terms`): the
        network's output F against its effective target (x_0 − c_skip·x)/c_out, which is eq. 8's
        λ(σ)‖D − x_0‖² with λ = 1/c_out²."""
        b = x0.shape[0]
        g = global_batch or b
        sigma = self.draw_t(g, x0.device, generator)
        eps = torch.randn((g, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, generator=generator)
        if g != b:
            sigma, eps = sigma[offset: offset + b], eps[offset: offset + b]
        x = self.q_sample(x0, sigma, eps)
        s = self._sigma(sigma, x0)
        output = model(x * self.c_in(s), self.net_time(sigma), **(conditions or {}))
        target = (x0 - self.c_skip(s) * x) / self.c_out(s)
        if not per_sample:
            return LossTerms(loss_fn(output, target), None, sigma)
        losses = loss_fn(output, target, reduction="none").reshape(b, -1).mean(dim=1)
        return LossTerms(losses.mean(), losses.detach(), sigma)

    # -- sampling: the probability-flow ODE in σ --------------------------------
    def grid(self, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ρ-grid of ``steps`` σ's from σ_max to σ_min, then 0 (float64, steps + 1 points)."""
        c = self.config
        i = torch.arange(steps, dtype=torch.float64, device=device)
        frac = i / max(steps - 1, 1)
        s = (c.sigma_max ** (1 / c.rho) + frac * (c.sigma_min ** (1 / c.rho) - c.sigma_max ** (1 / c.rho))) ** c.rho
        return torch.cat([s, s.new_zeros(1)])

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x at σ_max: N(0, σ_max²·I)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype) * self.config.sigma_max

    def prior_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, σ_max²·I) per image (float64; x_0's share of x at σ_max neglected)."""
        d, s = x[0].numel(), self.config.sigma_max
        return -0.5 * (x.double().flatten(1) ** 2).sum(1) / s ** 2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def drift(self, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """dx/dσ = (x − D(x; σ))/σ."""
        return (x - self.denoised(output, x, sigma)) / self._sigma(sigma, x)

    def eps_and_x0(self, output: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂_0 = D)."""
        d = self.denoised(output, xt, sigma)
        return (xt - d) / self._sigma(sigma, xt), d


def make(config: EDMConfig, *, clip_sample: bool = False, prediction: str = "epsilon",
         variance_type: str = "fixed_small") -> EDMProcess:
    if prediction != "epsilon":
        raise ddpmkit.DdpmkitError(f"process 'edm' predicts through its preconditioning (D = c_skip·x + c_out·F); "
                                   f"--prediction {prediction} is for the vp process (drop it, or use --process vp)")
    if variance_type == "learned_range":
        raise ddpmkit.DdpmkitError("process 'edm' has no learned variance; drop --learn-variance / --variance "
                                   "learned_range, or use --process vp")
    return EDMProcess(config, clip_sample=clip_sample)


# EDM's objective λ(σ)·‖D − x_0‖² is the plain squared error of F against its target (λ·c_out² = 1),
# so the process trains with ``mse`` unless the user names a loss (smooth-L1 breaks the weighting).
make.default_loss = "mse"


@ddpmkit.hookimpl
def register_processes(register):
    register("edm", make, EDMConfig, "EDM (Karras et al. 2022): σ-parameterised, preconditioned, log-normal σ, ρ-grid")

