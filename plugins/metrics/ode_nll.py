"""Metric ``ode-nll``: −log p(x) through the process's probability-flow ODE, in bits per dimension.

    log p_0(x_0) = log p_T(x_T) + ∫_0^T ∇·f(x_t, t) dt                (``ddpmkit.sdk.ode.log_likelihood``)

on real images the model did not train on (the same images as ``nll``: the run's dataset, its test
split where it has one), uniformly dequantized (x̃ = x + u·2/255, u ~ U(−½, ½)), for every process:
``vp`` through its ODE view (x_t/√ᾱ_t over training timesteps), ``flow``, ``edm`` — so runs of
different processes compare. Bits per dimension: −(log p(x̃) + D·log(2/255))/(D·ln 2), an upper
bound, by Jensen's inequality over u, on −log₂ P of the 8-bit image. ``nll`` (vp only) bounds the
same discrete quantity from above by the variational bound with a discretized decoder; the two
need not agree, and the ODE's is usually the tighter (Song et al. 2021).
"""

from __future__ import annotations

import math

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.ode import bits_per_dim, log_likelihood

from .nll import NLL, NLLConfig


@attrs.define(kw_only=True)
class ODENLLConfig(NLLConfig):
    """Options of ``ode-nll`` (plus ``nll``'s dataset, data_root, split, max_batch, seed).

    steps: Heun steps of the ODE (2 network calls each, plus the divergence's). Default 64.
    exact: the exact divergence (D vector–Jacobian products per call: small images only); default
        False: Hutchinson's estimate with ``probes`` Rademacher vectors.
    probes: Hutchinson probes per call. Default 1.
    """

    steps: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    exact: bool = False
    probes: int = attrs.field(default=1, validator=attrs.validators.ge(1))


class ODENLL(NLL):
    needs_samples = False
    directions = {"ode_nll_bpd": "minimize"}

    def __call__(self, images: torch.Tensor, progress=None, context=None) -> dict[str, float]:
        pipe = getattr(context, "pipeline", None)
        if pipe is None:
            raise ddpmkit.DdpmkitError("ode-nll scores a model: give a CHECKPOINT (it cannot score --images)")
        x0, labels = self.real_images(pipe, len(images))
        conditional = bool(getattr(pipe.model, "conditions", ()))
        model, c = pipe.model.eval(), self.config
        g = torch.Generator(device=self.device).manual_seed(c.seed)
        bpd = []
        chunk = max(1, min(len(x0), c.max_batch))
        for i in range(0, len(x0), chunk):
            x = x0[i:i + chunk].to(self.device)
            x = x + (torch.rand(x.shape, generator=g, device=self.device) - 0.5) * (2 / 255)
            with torch.inference_mode(False):  # (evaluate runs in inference mode; the divergence needs autograd)
                cond = {"class_labels": labels[i:i + chunk].clone().to(self.device)} \
                    if conditional and labels is not None else {}
            net = (lambda x, t, _c=cond: model(x, t, **_c)) if cond else model
            log_p = log_likelihood(pipe.diffusion, net, x, steps=c.steps, exact=c.exact, probes=c.probes, generator=g)
            bpd.append(bits_per_dim(log_p, x[0].numel()).cpu())
            if progress is not None:
                progress(min(i + chunk, len(x0)))
        v = torch.cat(bpd)
        return {"ode_nll_bpd": float(v.mean()),
                "ode_nll_bpd_stderr": float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0}


@ddpmkit.hookimpl
def register_metrics(register):
    register("ode-nll", ODENLL, ODENLLConfig,
             "−log p(x) in bits/dim through the probability-flow ODE, any process (dequantized held-out images)")
