"""The plugin interface of ddpmkit: one hook per kind of component.

A plugin is any module (or object) with functions marked ``@ddpmkit.hookimpl``
whose names are among the hooks below. Each hook receives a ``register``
callback; call it once per component the plugin provides::

    import attrs, ddpmkit

    @attrs.define
    class MyScheduleConfig:
        timesteps: int = 1000

    @ddpmkit.hookimpl
    def register_schedules(register):
        register("my-schedule", make_betas, MyScheduleConfig, "what it is")

``register(name, factory, config_class=None, description="")``: ``factory`` is
called with an instance of ``config_class`` (an attrs class whose defaults and
validators define the component's options) plus the keyword context documented
for each kind below. Installed packages make their plugin known through the
setuptools entry-point group ``ddpmkit``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ddpmkit")
hookimpl = pluggy.HookimplMarker("ddpmkit")


@hookspec
def register_schedules(register):
    """Register noise schedules.

    ``factory(config) -> torch.Tensor``: the betas β_1..β_T, shape ``(T,)``,
    float64, every value in (0, 1).
    """


@hookspec
def register_predictors(register):
    """Register noise predictors ε_θ.

    ``factory(config, *, channels: int, resolution: int) -> torch.nn.Module``
    whose ``forward(x_t, t)`` takes ``x_t`` of shape ``(B, channels, resolution,
    resolution)`` and integer timesteps ``t`` of shape ``(B,)`` (0-based: index
    ``t`` is the paper's step ``t + 1``) and returns a tensor shaped like ``x_t``.
    """


@hookspec
def register_losses(register):
    """Register training losses.

    ``factory(config) -> callable(prediction, target, reduction="mean") -> tensor``: a scalar
    for ``reduction="mean"``; per-element losses for ``reduction="none"`` (needed by min-SNR
    weighting; a loss without it still trains without weighting).
    """


@hookspec
def register_datasets(register):
    """Register datasets.

    ``factory(config) -> torch.utils.data.Dataset`` whose items are float
    tensors ``(C, H, W)`` scaled to [-1, 1] (or ``(image, label)`` pairs).
    """


@hookspec
def register_metrics(register):
    """Register sample-quality metrics.

    ``factory(config, *, device) -> callable(images) -> dict[str, float]`` where
    ``images`` is a float tensor ``(N, C, H, W)`` in [-1, 1].
    """


@hookspec
def register_samplers(register):
    """Register samplers (reverse processes).

    ``factory(config, *, diffusion) -> sampler`` where ``diffusion`` is the trained model's
    :class:`~ddpmkit.diffusion.GaussianDiffusion` and ``sampler`` has ``num_steps`` (int) and
    ``sample(model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32)``
    returning x_0 of ``shape``; ``progress(k)`` is called after the k-th network evaluation.
    """
