"""What distillation plugins (``register_distillers``) build on: a stage of training, and the ODE
steps a teacher takes.

A distiller sees the teacher and the student as drift functions ``f(x, t, labels) -> dx/dt`` on the
teacher's probability-flow ODE (``ddpmkit.sdk.ode``): ``x`` in the ODE's coordinates, ``t`` float64
``(B,)`` times of the ODE's grid, ``labels`` long ``(B,)`` (``None`` for an unconditional run).
``ddpmkit distill`` (``ddpmkit.run.distill``) builds them from the networks, trains the student on the
distiller's ``loss`` stage by stage, and writes the student as a run that ``ddpmkit sample`` draws in
``stage.calls`` calls.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

Drift = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@attrs.frozen
class Stage:
    """One stage of a distillation.

    steps: optimizer steps of the stage (each on one batch).
    calls: network calls the student samples in once the stage is done.
    """

    steps: int
    calls: int


def times(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A time (a float or a 0-d tensor) as the float64 ``(B,)`` tensor drift functions take, B = ``like``'s batch."""
    return torch.full((like.shape[0],), float(t), dtype=torch.float64, device=like.device)


def per_image(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` values broadcast over images shaped like ``x``, in its dtype."""
    return t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


METRICS = ("mse", "pseudo-huber")


def distance(error: torch.Tensor, metric: str = "mse", weight: torch.Tensor | None = None) -> torch.Tensor:
    """The batch mean of a per-image distance of ``error`` (``(B, ...)``), each image's term scaled by
    ``weight`` (``(B,)``, default 1).

    ``mse``: the mean squared error. ``pseudo-huber`` (Song & Dhariwal 2023): sqrt(‖e‖² + c²) − c per image,
    c = 0.00054·√d with d the numbers in one image; near the squared error (/2c) for small errors and
    like the L2 norm for large ones, so a few targets the student cannot fit do not dominate its gradient.
    """
    squares = error.flatten(1).pow(2)
    if metric == "mse":
        terms = squares.mean(1)
    elif metric == "pseudo-huber":
        c = 0.00054 * error[0].numel() ** 0.5
        terms = (squares.sum(1) + c * c).sqrt() - c
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return (terms if weight is None else weight.to(error.dtype) * terms).mean()


def euler_step(f: Drift, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
               labels: torch.Tensor | None) -> torch.Tensor:
    """One Euler step of ``dx/dt = f`` from the times ``t`` to ``t_next`` (float64 ``(B,)``; one call):
    x + (t_next − t)·f(x, t)."""
    return x + per_image(t_next - t, x) * f(x, t, labels)


def heun_step(f: Drift, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              labels: torch.Tensor | None) -> torch.Tensor:
    """One Heun step from ``t`` to ``t_next`` (float64 ``(B,)``), as the ``heun`` sampler takes it:
    Euler's x' = x + h·f(x, t), then x + h·(f(x, t) + f(x', t_next))/2 for the images whose t_next > 0;
    those that reach t = 0 keep x' (two calls; one where every image reaches 0)."""
    h = per_image(t_next - t, x)
    d = f(x, t, labels)
    x_euler = x + h * d
    if not bool((t_next > 0).any()):
        return x_euler
    corrected = x + h * (d + f(x_euler, t_next, labels)) / 2
    return torch.where(per_image(t_next, x) > 0, corrected, x_euler)


def euler(f: Drift, x: torch.Tensor, ts: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Euler's method on ``dx/dt = f`` along the times ``ts`` (1-d; one call per step)."""
    for i in range(ts.shape[0] - 1):
        x = euler_step(f, x, times(ts[i], x), times(ts[i + 1], x), labels)
    return x


def heun(f: Drift, x: torch.Tensor, ts: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Heun's method along the times ``ts`` (1-d), the last step to t = 0 Euler's, as the ``heun``
    sampler (2·steps − 1 calls)."""
    for i in range(ts.shape[0] - 1):
        x = heun_step(f, x, times(ts[i], x), times(ts[i + 1], x), labels)
    return x
