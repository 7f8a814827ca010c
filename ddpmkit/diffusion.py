"""The DDPM math, in one file, each equation beside its code.

Equation numbers ``(n)`` are those of the seed report (Milestone 2); where the
report slips, the DDPM paper (Ho et al. 2020) is followed and the comment says so.

Indexing: the paper's steps are t = 1..T. Tensors here are 0-based, so table
entry ``i`` holds the paper's step ``t = i + 1``, and the network is called with
``i`` (exactly as diffusers' schedulers do). All tables are computed in float64
and cast to the sample's dtype only when used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import torch
from torch import Tensor

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
PREDICTIONS = ("epsilon", "x0", "v")
# The same targets as diffusers' schedulers name them (``prediction_type``)
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


class ModelOutput(NamedTuple):
    """The network's output read by the diffusion process.

    prediction: ε, x₀ or v (per ``GaussianDiffusion.prediction``), shaped like x_t.
    variance: with ``variance_type="learned_range"``, the improved-DDPM interpolation v ∈ [-1, 1]
        between log β̃_t and log β_t, shaped like x_t; else ``None``.
    """

    prediction: Tensor
    variance: Tensor | None = None


@attrs.frozen
class LossContext:
    """What a loss that asks for ``context`` receives (improved-diffusion's ``training_losses`` inputs).

    x0, xt, noise: ``(B, C, H, W)``; t: 0-based timesteps ``(B,)``; output: the full
    :class:`ModelOutput`; target: what the prediction is compared with; weights: the timestep
    sampler's per-sample weights ``(B,)`` or ``None`` (applied by the core, not the loss);
    diffusion: the :class:`GaussianDiffusion` (tables, ``q_posterior``, ``p_log_variance``).
    """

    x0: Tensor
    xt: Tensor
    t: Tensor
    noise: Tensor
    output: ModelOutput
    target: Tensor
    weights: Tensor | None
    diffusion: Any


class LossTerms(NamedTuple):
    """One draw of the training objective: the scalar to minimise and, when asked, per-sample losses."""

    loss: Tensor
    per_sample: Tensor | None
    t: Tensor


def _gather(table: Tensor, i: Tensor, x: Tensor, _cache: dict = {}) -> Tensor:  # noqa: B006 (a deliberate cache)
    """``table[i]`` reshaped to broadcast over ``x`` (shape ``(B, 1, 1, 1)``).

    Tables live on the CPU in float64; their copy on ``x``'s device is made once and kept, so a
    sampling loop on a GPU does no host-to-device copy per step.
    """
    if table.device != x.device:
        key = (id(table), x.device)
        cached = _cache.get(key)
        if cached is None or cached[0] is not table:
            cached = _cache[key] = (table, table.to(x.device))
        table = cached[1]
    return table[i].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """The forward process q, its posterior, and the learned reverse process p_θ.

    Args:
        betas: β_1..β_T, shape ``(T,)``; every value must lie in (0, 1).
        variance_type: ``"fixed_small"`` uses σ_t² = β̃_t (the posterior
            variance), ``"fixed_large"`` uses σ_t² = β_t. Both are in the paper.
            Default ``"fixed_small"``.
        clip_sample: clip the predicted x_0 to ``[-clip_range, clip_range]``
            before forming the reverse mean. Default ``False`` (the seed's
            Algorithm 2 has no clipping).
        clip_range: bound used when ``clip_sample`` is on. Default ``1.0``.
        prediction: what the network predicts: ``"epsilon"`` (the noise ε, the paper's
            choice and the default), ``"x0"`` (the clean image) or ``"v"``
            (v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, Salimans & Ho 2022).
    """

    def __init__(self, betas: Tensor, variance_type: str = "fixed_small", clip_sample: bool = False,
                 clip_range: float = 1.0, prediction: str = "epsilon"):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 1:
            raise ValueError("a schedule needs at least one step (T >= 1)")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}, not {variance_type!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, not {prediction!r}")
        self.variance_type = variance_type
        self.prediction = prediction
        self.clip_sample = clip_sample
        self.clip_range = clip_range
        self.num_timesteps = T = betas.numel()

        # --- Schedule tables (float64) ---------------------------------------
        self.betas = betas                                         # β_t
        self.alphas = 1.0 - betas                                  # α_t = 1 − β_t
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)    # ᾱ_t = ∏_{s≤t} α_s
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])  # ᾱ_{t−1}, ᾱ_0 = 1
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()                   # √ᾱ_t
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()  # √(1 − ᾱ_t)
        self.sqrt_recip_alphas = (1.0 / self.alphas).sqrt()                      # 1/√α_t
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()      # 1/√ᾱ_t
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()  # √(1/ᾱ_t − 1)
        # eq. (9) coefficient: (1 − α_t)/√(1 − ᾱ_t) = β_t/√(1 − ᾱ_t)
        self.eps_coef = self.betas / self.sqrt_one_minus_alphas_cumprod
        # Posterior q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)   (DDPM paper eq. 6–7)
        #   β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t
        self.posterior_variance = (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas
        #   μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t
        self.posterior_mean_coef1 = self.alphas_cumprod_prev.sqrt() * self.betas / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # σ_t of Algorithm 2, line 5 (σ² = β̃_t or β_t). β̃ for the first step is
        # 0; it is never used because z = 0 there (clamped like diffusers).
        if variance_type == "fixed_large":
            self.sigma = self.betas.sqrt()
        else:  # fixed_small; learned_range samples with its own per-pixel σ (p_log_variance)
            self.sigma = self.posterior_variance.clamp(min=1e-20).sqrt()
        # log β̃_t with its first entry (0) replaced by β̃_2, as improved DDPM clips it; log β_t
        self.posterior_log_variance_clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]).log() \
            if T > 1 else self.betas.log()
        self.log_betas = self.betas.log()
        assert self.sigma.shape == (T,)
        # signal-to-noise ratio SNR(t) = ᾱ_t / (1 − ᾱ_t), for min-SNR loss weighting
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------------
    # Forward process
    # ------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) in closed form (DDPM paper eq. 4):

        x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,   ε ~ N(0, I).

        Args:
            x0: clean images, shape ``(B, C, H, W)``.
            t: 0-based timesteps, shape ``(B,)``, long.
            noise: ε, shape like ``x0``.
        """
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean μ̃_t(x_t, x_0) and variance β̃_t of q(x_{t−1} | x_t, x_0), shapes ``(B,C,H,W)`` and ``(B,1,1,1)``."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, _gather(self.posterior_variance, t, xt)

    # ------------------------------------------------------------------------
    # Training: Algorithm 1
    # ------------------------------------------------------------------------
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network learns to output: ε, x_0, or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
        if self.prediction == "epsilon":
            return eps
        if self.prediction == "x0":
            return x0
        return _gather(self.sqrt_alphas_cumprod, t, x0) * eps - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def training_loss(self, model: Callable[..., Tensor], x0: Tensor, loss_fn: Callable[..., Tensor],
                      generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                      global_batch: int | None = None, offset: int = 0, **kwargs) -> Tensor:
        """One draw of the objective of Algorithm 1 (eq. 10–11 with any loss), as a scalar:

        t ~ Uniform({1..T}), ε ~ N(0, I),
        loss(ε, ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)).

        (The seed's Algorithm 1 writes α_t; the paper's ᾱ_t is right.) With another
        prediction target the loss compares the network's output with that target.
        Arguments as :meth:`loss_terms`.
        """
        return self.loss_terms(model, x0, loss_fn, generator, min_snr_gamma, global_batch, offset, **kwargs).loss

    def loss_terms(self, model: Callable[..., Tensor], x0: Tensor, loss_fn: Callable[..., Tensor],
                   generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                   global_batch: int | None = None, offset: int = 0, timestep_sampler: Any = None,
                   conditions: dict[str, Tensor] | None = None, per_sample: bool = False,
                   loss_context: bool = False) -> LossTerms:
        """Algorithm 1's objective, with the extensions the plugin contract allows.

        Args:
            model: the network, ``model(x_t, t, **conditions)``.
            x0: a batch of clean images ``(B, C, H, W)``.
            loss_fn: ``loss_fn(prediction, target)``; called with ``reduction="none"`` (per-element or
                per-sample losses, first axis B) when per-sample losses are needed.
            generator: source of t and ε.
            min_snr_gamma: weight each sample by min(SNR(t), γ)/SNR(t) for ε, min(SNR(t), γ)
                for x_0, min(SNR(t), γ)/(SNR(t) + 1) for v (Hang et al. 2023). Default off.
            global_batch, offset: for data-parallel training, t and ε are drawn for the whole
                global batch (same generator on every process) and rows ``offset:offset + B``
                are used, so N processes draw exactly what one process would. Default: ``B``, 0.
            timestep_sampler: draws ``(t, weights)`` (``sample(batch, device, generator)``);
                default uniform t with no weights, Algorithm 1 line 3.
            conditions: keyword inputs of the network, e.g. ``{"class_labels": y}``.
            per_sample: also return the per-sample losses ``(B,)`` (detached), e.g. for a timestep
                sampler that learns from them.
            loss_context: pass ``context=LossContext(...)`` to ``loss_fn``.
        """
        b = x0.shape[0]
        g = global_batch or b
        if timestep_sampler is None:                                                             # line 3
            t, weights = torch.randint(0, self.num_timesteps, (g,), device=x0.device, generator=generator), None
        else:
            t, weights = timestep_sampler.sample(g, x0.device, generator)
        eps = torch.randn((g, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, generator=generator)  # line 4
        if g != b:
            t, eps = t[offset: offset + b], eps[offset: offset + b]
            weights = None if weights is None else weights[offset: offset + b]
        xt = self.q_sample(x0, t, eps)                                                           # eq. (10)
        output = self.prediction_and_variance(model(xt, t, **(conditions or {})))
        target = self.target(x0, eps, t)
        kw = {"context": LossContext(x0, xt, t, eps, output, target, weights, self)} if loss_context else {}
        if not (min_snr_gamma or per_sample or weights is not None):
            return LossTerms(loss_fn(output.prediction, target, **kw), None, t)                 # line 5
        per_element = loss_fn(output.prediction, target, reduction="none", **kw)
        losses = per_element.reshape(b, -1).mean(dim=1)
        if min_snr_gamma:
            snr = self.snr.to(x0.device)[t]
            clipped = snr.clamp(max=min_snr_gamma)
            weight = {"epsilon": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction]
            losses = weight.to(losses.dtype) * losses
        weighted = losses if weights is None else weights.to(losses.dtype) * losses
        return LossTerms(weighted.mean(), losses.detach() if per_sample else None, t)

    # ------------------------------------------------------------------------
    # Reverse process: eq. (9) and Algorithm 2
    # ------------------------------------------------------------------------
    def predict_x0(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε_θ."""
        return _gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def prediction_and_variance(self, output: Tensor) -> ModelOutput:
        """The network's raw output as a :class:`ModelOutput`: with ``learned_range`` the first C
        channels are the prediction and the last C the variance interpolation v; else all prediction."""
        if self.variance_type != "learned_range":
            return ModelOutput(output)
        prediction, variance = output.chunk(2, dim=1)
        return ModelOutput(prediction, variance)

    def p_log_variance(self, v: Tensor, t: Tensor, xt: Tensor) -> Tensor:
        """log σ²_θ(x_t, t) of a learned variance (improved DDPM, Nichol & Dhariwal 2021, eq. 15):

        log σ² = f · log β_t + (1 − f) · log β̃_t,  f = (v + 1)/2, with β̃_1 replaced by β̃_2.
        """
        frac = (v + 1) / 2
        return frac * _gather(self.log_betas, t, xt) + (1 - frac) * _gather(self.posterior_log_variance_clipped, t, xt)

    def eps_and_x0(self, output: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The network's output as (ε̂, x̂_0), whatever it predicts; x̂_0 is clipped when clipping is on.
        A learned variance in the output is set aside (see :meth:`prediction_and_variance`)."""
        if output.shape[1] != xt.shape[1]:  # the raw output, prediction and variance
            output = self.prediction_and_variance(output).prediction
        a, s = _gather(self.sqrt_alphas_cumprod, t, xt), _gather(self.sqrt_one_minus_alphas_cumprod, t, xt)
        if self.prediction == "epsilon":
            eps, x0 = output, self.predict_x0(xt, t, output)
        elif self.prediction == "x0":
            x0, eps = output, (xt - a * output) / s
        else:  # v: x_0 = √ᾱ x_t − √(1 − ᾱ) v,  ε = √ᾱ v + √(1 − ᾱ) x_t
            x0, eps = a * xt - s * output, a * output + s * xt
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return eps, x0

    def p_mean(self, output: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """μ_θ(x_t, t) from the network's output.

        For ε-prediction without clipping this is eq. (9):
            μ_θ = 1/√α_t · (x_t − (1 − α_t)/√(1 − ᾱ_t) · ε_θ(x_t, t)).
        Otherwise x̂_0 is formed (and clipped) and μ_θ = μ̃_t(x_t, x̂_0), which equals
        eq. (9) whenever nothing is clipped.
        """
        if self.prediction == "epsilon" and not self.clip_sample:
            return _gather(self.sqrt_recip_alphas, t, xt) * (xt - _gather(self.eps_coef, t, xt) * output)
        return self.q_posterior(self.eps_and_x0(output, xt, t)[1], xt, t)[0]

    # The names of ddpmkit 0.1 (kept for plugins written against it): the same methods
    split_output = eps_and_x0
    split_model_output = prediction_and_variance
    training_losses = loss_terms

    def p_step(self, output: Tensor, xt: Tensor, t: int, noise: Tensor | None, t_batch: Tensor | None = None) -> Tensor:
        """One reverse step, Algorithm 2 lines 3–5: x_{t−1} = μ_θ(x_t, t) + σ_t z.

        Args:
            output: the network's raw output at (x_t, t) (ε_θ for ε-prediction), shape like ``xt``
                (twice the channels with a learned variance).
            xt: current sample, ``(B, C, H, W)``.
            t: the 0-based step (the same for the whole batch).
            noise: z ~ N(0, I) shaped like ``xt``; ignored (z = 0) when ``t == 0``.
            t_batch: ``t`` repeated for the batch, shape ``(B,)``, long, on ``xt``'s device, if the
                caller has it already. Default: made here.
        """
        ti = torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device) if t_batch is None else t_batch
        out = self.prediction_and_variance(output)
        mean = self.p_mean(out.prediction, xt, ti)
        if t == 0 or noise is None:   # line 3: z = 0 at the last step
            return mean
        if out.variance is not None:  # σ_t from the network (improved DDPM)
            return mean + (0.5 * self.p_log_variance(out.variance, ti, xt)).exp() * noise
        return mean + self.sigma[t].item() * noise

    def _p_step_in_place(self, eps: Tensor, x: Tensor, t: int, z: Tensor | None, s1: Tensor, s2: Tensor) -> None:
        """:meth:`p_step` for ε-prediction, written into ``x`` (``z``, ``s1``, ``s2`` are overwritten).

        The same operations in the same order as ``p_step``, so the same numbers bit for bit
        (tested), with each coefficient a number from the CPU table instead of a gathered tensor:
        no tensor is allocated and nothing waits for the device.
        """
        c = lambda table: table[t].item()  # noqa: E731
        if not self.clip_sample:  # eq. (9): μ_θ = 1/√α_t · (x_t − (1 − α_t)/√(1 − ᾱ_t) · ε_θ)
            torch.sub(x, torch.mul(eps, c(self.eps_coef), out=s1), out=x).mul_(c(self.sqrt_recip_alphas))
        else:  # x̂_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε_θ, clipped; μ_θ = μ̃_t(x_t, x̂_0) (eq. 7)
            x0 = torch.mul(x, c(self.sqrt_recip_alphas_cumprod), out=s1)
            x0.sub_(torch.mul(eps, c(self.sqrt_recipm1_alphas_cumprod), out=s2)).clamp_(-self.clip_range, self.clip_range)
            x.mul_(c(self.posterior_mean_coef2)).add_(x0.mul_(c(self.posterior_mean_coef1)))
        if z is not None:  # x_{t−1} = μ_θ + σ_t z
            x.add_(z.mul_(c(self.sigma)))

    @torch.inference_mode()
    def sample(self, model: Callable[[Tensor, Tensor], Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               progress: Callable[[int], None] | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Algorithm 2: draw ``shape[0]`` images from p_θ.

        Args:
            model: ε_θ, called as ``model(x_t, t)`` with 0-based ``t`` of shape ``(B,)``. Both
                arguments are the loop's buffers, overwritten at the next step: a model that keeps
                them past its return must copy them.
            shape: ``(B, C, H, W)``.
            generator: the source of x_T and every z; the same generator state
                gives the same samples.
            device: where to sample.
            progress: called with the number of finished steps after each step.
            dtype: dtype of the samples. Default float32.
        Returns:
            x_0, shape ``shape``, not clamped.
        """
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)           # line 1: x_T ~ N(0, I)
        # Buffers made once: outside the network nothing is allocated per step, and nothing in the loop
        # waits for the device (σ_t and the other coefficients are read from the CPU tables as numbers).
        t_batch = torch.empty(shape[0], dtype=torch.long, device=device)
        z_buf = torch.empty(shape, device=device, dtype=dtype)
        in_place = self.prediction == "epsilon"
        scratch = [torch.empty(shape, device=device, dtype=dtype) for _ in range(2 if in_place else 0)]
        for n, t in enumerate(reversed(range(self.num_timesteps))):                       # line 2: t = T..1
            z = torch.randn(shape, generator=generator, out=z_buf) if t > 0 else None     # line 3
            eps = model(x, t_batch.fill_(t))
            if in_place and eps.dtype == x.dtype and eps.shape == x.shape:
                self._p_step_in_place(eps, x, t, z, *scratch)                              # lines 4–5
            else:
                x = self.p_step(eps, x, t, z, t_batch)                                     # lines 4–5
            if progress is not None:
                progress(n + 1)
        return x                                                                           # line 7

    # ------------------------------------------------------------------------
    # The variational bound (seed report: L = L_T + Σ_{t>1} L_{t−1} + L_0; DDPM paper eq. 5)
    # ------------------------------------------------------------------------
    def model_log_variance(self, output: ModelOutput, xt: Tensor, t: Tensor) -> Tensor:
        """log σ²_θ(x_t, t) as the bound uses it, broadcastable to ``xt``.

        fixed_small: log β̃_t; fixed_large: log β_t; both with the first step's variance replaced by
        β̃_2 (β̃_1 = 0 would make the decoder a point mass), as improved DDPM does. learned_range:
        :meth:`p_log_variance`.
        """
        if output.variance is not None:
            return self.p_log_variance(output.variance, t, xt)
        if self.variance_type == "fixed_large":
            table = torch.cat([self.posterior_log_variance_clipped[:1], self.log_betas[1:]])
        else:
            table = self.posterior_log_variance_clipped
        return _gather(table, t, xt)

    def vlb_terms(self, output: ModelOutput, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """One term of the bound per image, in bits per dimension, shape ``(B,)``:

        t > 0 (the paper's t ≥ 2): L_{t−1} = KL( q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t) ),
            a KL between two Gaussians (DDPM eq. 5), the posterior of eq. 6–7 against
            N(μ_θ(x_t, t), σ²_θ);
        t = 0 (the paper's t = 1): L_0 = −log p_θ(x_0 | x_1), the discretized Gaussian decoder of
            DDPM §3.3 over the 256 bins of 8-bit data scaled to [-1, 1].

        ``output`` is the network's :class:`ModelOutput` at (x_t, t); float64 throughout.
        """
        x0, xt = x0.double(), xt.double()
        output = ModelOutput(output.prediction.double(), None if output.variance is None else output.variance.double())
        true_mean, true_var = self.q_posterior(x0, xt, t)
        mean = self.p_mean(output.prediction, xt, t)
        log_var = self.model_log_variance(output, xt, t)
        terms = normal_kl(true_mean, true_var.clamp_min(1e-300).log(), mean, log_var).flatten(1).mean(dim=1)
        first = t == 0
        if bool(first.any()):  # the decoder only where t = 0: elsewhere its tail terms underflow (NaN gradients)
            nll = -discretized_gaussian_log_likelihood(x0[first], mean[first], 0.5 * log_var.expand_as(xt)[first])
            terms = terms.masked_scatter(first, nll.flatten(1).mean(dim=1))
        return terms / math.log(2.0)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL( q(x_T | x_0) ‖ N(0, I) ) per image in bits per dimension, ``(B,)``; no parameters."""
        x0 = x0.double()
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean = _gather(self.sqrt_alphas_cumprod, t, x0) * x0
        log_var = _gather((1.0 - self.alphas_cumprod).log(), t, x0)
        return normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(dim=1) / math.log(2.0)

    @torch.no_grad()
    def nll_bpd(self, model: Callable[..., Tensor], x0: Tensor, generator: torch.Generator | None = None,
                max_batch: int = 256, conditions: dict[str, Tensor] | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
        """The variational bound on −log p_θ(x_0) of each image, in bits per dimension (float64):

            L = L_T + Σ_{t=2..T} L_{t−1} + L_0   (every t evaluated once, one x_t ~ q(x_t | x_0) each)

        Args:
            model: the network, ``model(x_t, t, **conditions)``.
            x0: images ``(B, C, H, W)`` in [-1, 1] (8-bit data scaled: the decoder's bins are 2/255 wide).
            generator: source of the noise of every x_t.
            max_batch: images × timesteps per network call (several t are batched together).
            conditions: keyword inputs of the network, each ``(B, ...)``.
            progress: called with the number of timesteps done.
        Returns:
            ``{"total", "prior", "kl", "decoder"}``, each ``(B,)``: the bound, L_T, Σ L_{t−1}, L_0.
        """
        b, T = x0.shape[0], self.num_timesteps
        per_call = max(1, max_batch // b)
        kl = torch.zeros(b, dtype=torch.float64, device=x0.device)
        decoder = torch.zeros_like(kl)
        done = 0
        for start in range(T - 1, -1, -per_call):
            ts = torch.arange(start, max(start - per_call, -1), -1, device=x0.device)        # a block of t
            k = ts.numel()
            t = ts.repeat_interleave(b)
            x = x0.repeat(k, *[1] * (x0.ndim - 1))
            noise = torch.randn(x.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            xt = self.q_sample(x, t, noise)
            cond = {key: v.repeat(k, *[1] * (v.ndim - 1)) for key, v in (conditions or {}).items()}
            terms = self.vlb_terms(self.prediction_and_variance(model(xt, t, **cond)), x, xt, t).reshape(k, b)
            at_zero = ts == 0
            kl += terms[~at_zero].sum(dim=0)
            decoder += terms[at_zero].sum(dim=0)
            done += k
            if progress is not None:
                progress(done)
        prior = self.prior_bpd(x0)
        return {"total": prior + kl + decoder, "prior": prior, "kl": kl, "decoder": decoder}


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL( N(mean1, e^logvar1) ‖ N(mean2, e^logvar2) ) per element, in nats:

    ½ ( −1 + logvar2 − logvar1 + e^(logvar1 − logvar2) + (mean1 − mean2)² e^(−logvar2) ).
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) per element of 8-bit data scaled to [-1, 1] under N(mean, e^(2·log_scale)) discretized
    into 256 bins of width 2/255 (DDPM §3.3): the Gaussian mass of [x − 1/255, x + 1/255], with the
    edge bins reaching to −∞ (x = −1) and +∞ (x = 1). Exact normal CDFs (``torch.special``), float64.
    """
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv = torch.exp(-log_scale)
    upper = (x - mean + 1.0 / 255) * inv
    lower = (x - mean - 1.0 / 255) * inv
    log_cdf_upper = torch.special.log_ndtr(upper)           # log Φ(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)           # log (1 − Φ(lower))
    # log(Φ(upper) − Φ(lower)), computed on the side of the bin where it does not cancel: with survival
    # functions when the bin lies above the mean (lower > 0), with CDFs otherwise. Each side gets its
    # own inputs only where it is used and harmless ones (a bin at the mean) elsewhere: torch.where's
    # unused branch still runs backward, and log1p(−1) = −∞ there would turn a 0 gradient into NaN.
    above, edge = lower > 0, (x < -0.999) | (x > 0.999)
    a_up, a_lo = torch.where(above & ~edge, upper, 1.0), torch.where(above & ~edge, lower, 0.0)
    b_up, b_lo = torch.where(~above & ~edge, upper, 0.0), torch.where(~above & ~edge, lower, -1.0)
    a_sf_lo = torch.special.log_ndtr(-a_lo)
    b_cdf_up = torch.special.log_ndtr(b_up)
    mid = torch.where(above, a_sf_lo + torch.log1p(-torch.exp(torch.special.log_ndtr(-a_up) - a_sf_lo)),
                      b_cdf_up + torch.log1p(-torch.exp(torch.special.log_ndtr(b_lo) - b_cdf_up)))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, mid))
