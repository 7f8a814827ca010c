"""Metric ``nll``: the variational bound on the negative log-likelihood, in bits per dimension.

    L = L_T + Σ_{t=2..T} L_{t−1} + L_0                 (seed report; DDPM paper eq. 5)

on real images the model did not train on — the run's dataset with ``split=test`` where it has a
split (MNIST: the 10,000 test digits), else the training images themselves (``evaluate`` prints
and writes which, from the metric's ``data``). Reported in its parts — the prior term L_T, the
sum of the KL terms L_{t−1}, the discretized-Gaussian decoder term L_0 of 8-bit data (DDPM §3.3) —
with the standard error of the mean over images. Every t is evaluated once per image (one draw of
x_t), several t per network call, in float64 (``GaussianDiffusion.nll_bpd``). A T = 1000 model
costs T network evaluations per image: ``-n 256`` on the laptop network is about DDPM-1000
sampling of 256 images.

``ddpmkit evaluate RUN --metric nll -n N`` scores N real images (no sampling is done for it).
"""

from __future__ import annotations

import math

import attrs
import torch

import ddpmkit
from ddpmkit.sdk.metrics import random_subset, split_options


@attrs.define(kw_only=True)
class NLLConfig:
    """Options of ``nll``.

    dataset: the real images, a dataset plugin by name. Default: the run's dataset, its test split
        when it has a ``split`` option.
    data_root: that dataset's data_root. Default: the run's, else its own default.
    split: the split asked of a dataset that has one. Default ``test``.
    max_batch: images × timesteps per network call. Default 512.
    seed: seed of the subset of images and of the noise of every x_t. Default 0.
    """

    dataset: str | None = None
    data_root: str | None = None
    split: str = "test"
    max_batch: int = attrs.field(default=512, validator=attrs.validators.ge(1))
    seed: int = 0


class NLL:
    needs_samples = False  # scores real images: evaluate does not sample for it
    directions = {"nll_bpd": "minimize"}

    def __init__(self, config: NLLConfig, *, device=None):
        self.config = config
        self.device = torch.device(device or "cpu")
        self.data: str | None = None

    def real_images(self, pipe, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.config
        spec = pipe.config.dataset if pipe is not None and pipe.config is not None else None
        name = c.dataset or (spec.name if spec else None)
        if name is None:
            raise ddpmkit.DdpmkitError("nll needs a run (CHECKPOINT), or --set metric.dataset=NAME")
        options, has_split = split_options(name, spec.options if spec and spec.name == name else {}, pipe.resolution,
                                           c.split, c.data_root)
        images, labels = random_subset(ddpmkit.build("dataset", name, options), count, c.seed)
        self.data = f"{len(images)} images of {name}" + (f" ({c.split} split)" if has_split
                                                         else " (the training images: it has no test split)")
        return images, labels

    def __call__(self, images: torch.Tensor, progress=None, context=None) -> dict[str, float]:
        pipe = getattr(context, "pipeline", None)
        if pipe is None:
            raise ddpmkit.DdpmkitError("nll scores a model: give a CHECKPOINT (it cannot score --images)")
        x0, labels = self.real_images(pipe, len(images))
        conditional = bool(getattr(pipe.model, "conditions", ()))
        model, diffusion = pipe.model.eval(), pipe.diffusion
        if not hasattr(diffusion, "nll_bpd"):
            raise ddpmkit.DdpmkitError(f"nll is the variational bound of the vp process; this run's process is "
                                       f"'{getattr(diffusion, 'name', '?')}'")
        g = torch.Generator(device=self.device).manual_seed(self.config.seed)
        parts = {"total": [], "prior": [], "kl": [], "decoder": []}
        per_call = max(1, self.config.max_batch)
        chunk = max(1, min(len(x0), per_call))
        for i in range(0, len(x0), chunk):
            x = x0[i:i + chunk].to(self.device)
            cond = {"class_labels": labels[i:i + chunk].to(self.device)} if conditional and labels is not None else None
            done, size = i, len(x)
            out = diffusion.nll_bpd(model, x, generator=g, max_batch=per_call, conditions=cond,
                                    progress=(lambda k, _i=done, _n=size: progress(_i + _n * k // diffusion.num_timesteps))
                                    if progress else None)
            for key in parts:
                parts[key].append(out[key].cpu())
        res = {}
        for key, values in parts.items():
            v = torch.cat(values)
            name = "nll_bpd" if key == "total" else f"nll_{key}_bpd"
            res[name] = float(v.mean())
            if key == "total":
                res["nll_bpd_stderr"] = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
        return res


@ddpmkit.hookimpl
def register_metrics(register):
    register("nll", NLL, NLLConfig, "variational bound on −log p(x) in bits/dim on held-out real images (L_T, ΣL_t, L_0)")
