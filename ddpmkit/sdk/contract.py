"""The contract every component keeps, as checks shared by the run-time probe and the testing kit.

When a run starts (``ddpmkit.run.assembly.probe``) every component is called once on small inputs of
the run's own shapes, and each answer goes through the checks below; ``ddpmkit.testing`` runs the
same checks in a plugin author's tests. A broken answer raises :class:`ContractError`: one line
naming the component, its plugin and its pip distribution, what it returned and what was expected.
It is a :class:`~ddpmkit.errors.DdpmkitError` (the CLI prints it, exit 2) and an ``AssertionError``
(pytest reports it as a failed check).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import torch

from ddpmkit.errors import DdpmkitError

if TYPE_CHECKING:  # annotations only: the registry imports nothing of the contract
    from ddpmkit.sdk.registry import Component


class ContractError(DdpmkitError, AssertionError):
    """A component broke the plugin contract."""


def _label(comp: Component) -> str:
    return comp.label() if hasattr(comp, "label") else str(comp)


def fail(comp: Component, returned: str, expected: str) -> None:
    raise ContractError(f"{_label(comp)} returned {returned}; expected {expected}")


def describe(value: Any) -> str:
    """A short description of what a component returned: type, dtype, shape, range."""
    if isinstance(value, torch.Tensor):
        text = f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
        if value.numel() and (value.is_floating_point() or value.dtype in (torch.uint8, torch.int64, torch.int32)):
            v = value.detach().float()
            text += f" in [{v.min().item():.4g}, {v.max().item():.4g}]"
        return text
    return f"{type(value).__name__} {value!r}"[:120]


def check_betas(comp: Component, betas: Any, timesteps: int | None = None) -> torch.Tensor:
    """Betas: a float64 tensor ``(T,)``, T = ``timesteps`` when the config has it, 0 < β < 1, ᾱ decreasing."""
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or betas.numel() < 1:
        fail(comp, describe(betas), "betas as a tensor of shape (T,) with T >= 1")
    if betas.dtype != torch.float64:
        fail(comp, describe(betas), "betas as float64 (must be float64)")
    if timesteps is not None and betas.shape != (timesteps,):
        fail(comp, describe(betas), f"{timesteps} betas (expected {timesteps} betas, as its timesteps option says)")
    if not bool(torch.isfinite(betas).all() & ((betas > 0) & (betas < 1)).all()):
        fail(comp, describe(betas), "betas that lie in (0, 1)")
    alpha_bar = torch.cumprod(1 - betas, 0)
    if betas.numel() > 1 and not bool((alpha_bar[1:] < alpha_bar[:-1]).all()):
        fail(comp, "betas whose ᾱ_t is not decreasing", "ᾱ_t = ∏(1 − β_s) to decrease (ᾱ_t must decrease)")
    return betas


def predictor_outputs(model: torch.nn.Module) -> tuple[str, ...]:
    """What a predictor's output holds along the channel axis (its ``outputs`` attribute)."""
    return tuple(getattr(model, "outputs", ("prediction",)))


def predictor_conditions(model: torch.nn.Module) -> tuple[str, ...]:
    """The keyword inputs a predictor's ``forward`` accepts (its ``conditions`` attribute)."""
    return tuple(getattr(model, "conditions", ()))


def check_predictor_module(comp: Component, model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        fail(comp, describe(model), "a torch.nn.Module")
    outputs = predictor_outputs(model)
    if outputs not in (("prediction",), ("prediction", "variance")):
        fail(comp, f"a module declaring outputs = {outputs!r}", "outputs ('prediction',) or ('prediction', 'variance')")
    return model


def check_predictor_output(comp: Component, out: Any, x: torch.Tensor,
                           outputs: tuple[str, ...] = ("prediction",)) -> torch.Tensor:
    """The network's answer: a tensor in x_t's dtype, ``(B, k·C, H, W)`` with k outputs, finite."""
    b, c, h, w = x.shape
    want = (b, c * len(outputs), h, w)
    what = "shaped like x_t" if len(outputs) == 1 else f"2C channels (prediction, variance) = {want}"
    if not isinstance(out, torch.Tensor):
        fail(comp, describe(out), f"a tensor {what}")
    if out.dtype != x.dtype:
        fail(comp, f"{describe(out)} for {str(x.dtype).replace('torch.', '')} input {tuple(x.shape)}",
             f"output in the input's dtype ({str(x.dtype).replace('torch.', '')}), {what}")
    if tuple(out.shape) != want:
        fail(comp, f"{describe(out)} for input {tuple(x.shape)}", f"output of shape {want}, {what}")
    if not bool(torch.isfinite(out).all()):
        fail(comp, f"{describe(out)} with NaN or infinite values", "finite values")
    return out


def check_dataset_item(comp: Component, item: Any, index: int) -> tuple[torch.Tensor, int | None]:
    """An item: a float32 ``(C, H, W)`` tensor in [-1, 1], square, C in {1, 3}, or ``(image, int label)``."""
    label = None
    if isinstance(item, (tuple, list)):
        if len(item) < 1:
            fail(comp, f"item {index} as an empty {type(item).__name__}", "an image or an (image, label) pair")
        x = item[0]
        if len(item) > 1:
            label = item[1]
            try:
                label = int(label)
            except (TypeError, ValueError):
                fail(comp, f"item {index} with label {describe(item[1])}", "an integer class label")
    else:
        x = item
    expected = "a float32 (C, H, W) tensor in [-1, 1], square, with C = 1 or 3"
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        fail(comp, f"item {index} as {describe(x)}", expected)
    if x.dtype != torch.float32:
        fail(comp, f"item {index} as {describe(x)}", expected)
    if x.numel() and (x.min().item() < -1.0001 or x.max().item() > 1.0001):
        fail(comp, f"item {index} as {describe(x)}", expected + " (scale [0, 255] or [0, 1] images to [-1, 1])")
    c, h, w = x.shape
    if h != w or c not in (1, 3):
        fail(comp, f"item {index} as {describe(x)}", expected)
    if not bool(torch.isfinite(x).all()):
        fail(comp, f"item {index} with NaN or infinite values", expected)
    return x, label


def dataset_num_classes(dataset: Any) -> int | None:
    """``num_classes`` of a dataset, else ``len(classes)``, else ``None``."""
    n = getattr(dataset, "num_classes", None)
    if n is None and getattr(dataset, "classes", None) is not None:
        n = len(dataset.classes)
    return None if n is None else int(n)


def check_dataset(comp: Component, dataset: Any) -> tuple[int, int, bool]:
    """First, middle and last items kept; all of one shape. Returns (channels, resolution, labelled)."""
    try:
        n = len(dataset)
    except TypeError:
        fail(comp, describe(dataset), "a torch Dataset with __len__ and __getitem__")
    if n < 1:
        fail(comp, "an empty dataset", "at least one image")
    shapes, labelled = set(), set()
    for i in sorted({0, n // 2, n - 1}):
        x, label = check_dataset_item(comp, dataset[i], i)
        shapes.add(tuple(x.shape))
        labelled.add(label is not None)
    if len(shapes) > 1:
        fail(comp, f"items of different shapes {sorted(shapes)}", "every item of one shape")
    c, r, _ = shapes.pop()
    return c, r, labelled == {True}


def check_loss_value(comp: Component, value: Any, batch: int, reduction: str = "mean") -> torch.Tensor:
    """``reduction="mean"``: a finite scalar tensor that carries a gradient; ``"none"``: first axis B."""
    if reduction == "mean":
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            fail(comp, describe(value) + " for reduction='mean'", "a scalar tensor (shape ()) for reduction='mean'")
    elif not isinstance(value, torch.Tensor) or value.ndim < 1 or value.shape[0] != batch:
        fail(comp, describe(value) + " for reduction='none'",
             f"per-element or per-sample losses with first axis {batch} for reduction='none'")
    if not bool(torch.isfinite(value).all()):
        fail(comp, describe(value), "finite losses")
    return value


def check_sampler_object(comp: Component, sampler: Any) -> Any:
    steps = getattr(sampler, "num_steps", None)
    if not isinstance(steps, int) or not 1 <= steps:
        fail(comp, f"a sampler with num_steps = {steps!r}", "an int num_steps >= 1")
    if not callable(getattr(sampler, "sample", None)):
        fail(comp, describe(sampler), "an object with sample(model, shape, generator, device, progress, dtype)")
    return sampler


def check_samples(comp: Component, out: Any, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        fail(comp, describe(out), f"x_0 as a {str(dtype).replace('torch.', '')} tensor of shape {tuple(shape)}")
    if not bool(torch.isfinite(out).all()):
        fail(comp, f"{describe(out)} with NaN or infinite values", "finite samples")
    return out


def check_timesteps(comp: Component, answer: Any, batch: int, num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(t, weights)``: t long ``(batch,)`` in [0, T); weights ``(batch,)`` finite and >= 0, or None."""
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        fail(comp, describe(answer), "a pair (t, weights)")
    t, w = answer
    if not isinstance(t, torch.Tensor) or t.dtype != torch.long or tuple(t.shape) != (batch,):
        fail(comp, f"t as {describe(t)}", f"t as a long tensor of shape ({batch},)")
    if int(t.min()) < 0 or int(t.max()) >= num_timesteps:
        fail(comp, f"t as {describe(t)}", f"0-based timesteps in [0, {num_timesteps})")
    if w is not None and (not isinstance(w, torch.Tensor) or tuple(w.shape) != (batch,)
                          or not bool(torch.isfinite(w).all() & (w >= 0).all())):
        fail(comp, f"weights as {describe(w)}", f"None or finite weights >= 0 of shape ({batch},)")
    return t, w


def check_metric_result(comp: Component, result: Any) -> dict[str, float]:
    """A non-empty dict of str → finite float (ints and 0-d tensors are refused: results go to JSON)."""
    if not isinstance(result, dict) or not result:
        fail(comp, describe(result), "a non-empty dict of name → float")
    for key, value in result.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (float, int)) \
                or not math.isfinite(value):
            fail(comp, f"{{{key!r}: {describe(value)}}}", "a dict of str → finite float (use float(x) for tensors)")
    json.dumps(result, allow_nan=False)
    return {k: float(v) for k, v in result.items()}


def check_logger(comp: Component, logger: Any) -> Any:
    missing = [m for m in ("log", "flush", "close") if not callable(getattr(logger, m, None))]
    if missing:
        fail(comp, f"{describe(logger)} without {', '.join(missing)}", "an object with log(record), flush() and close()")
    return logger
