"""Evaluating samples with metric plugins: from a checkpoint (sampling first) or a folder of images.

(Metrics are built with ``ddpmkit.assembly.build_many("metric", names, options, device=...)``.)"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import attrs
import torch

from .contract import check_metric_result
from .errors import DdpmkitError
from .plugins import get_component


@attrs.frozen
class MetricContext:
    """What a metric that asks for ``context`` receives.

    pipeline: the trained :class:`~ddpmkit.pipeline.Pipeline` (model, diffusion, ``sample``), or
        ``None`` when only images are evaluated (``ddpmkit evaluate --images``).
    dataset: the run's training dataset (items ``(image, label)`` in [-1, 1]), or ``None``.
    seed: the run's seed, for metrics that draw their own samples.
    labels: for images drawn from a class-conditional model, the class each was asked for.
    """

    pipeline: Any = None
    dataset: Any = None
    seed: int = 0
    labels: Any = None  # the class of each image a class-conditional model was asked for ((N,) long), or None


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def evaluate_images(images: torch.Tensor, metrics: dict[str, Any], bar=None,
                    context: MetricContext | None = None) -> dict[str, float]:
    """Run every metric on ``images`` (N, C, H, W) in [-1, 1] in inference mode; one flat dict of floats.

    ``bar``: a rich Progress; metrics whose ``__call__`` takes ``progress`` report images done.
    ``context``: passed to metrics whose ``__call__`` takes ``context``. Each metric's answer is
    checked (a dict of finite floats) before it is used.
    """
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        kwargs = {}
        if bar is not None:
            task = bar.add_task(name, total=images.shape[0], info=f"{images.shape[0]} images")
            if _takes(metric, "progress"):
                kwargs["progress"] = lambda k, _t=task: bar.update(_t, completed=k)
        if _takes(metric, "context"):
            kwargs["context"] = context or MetricContext()
        with torch.inference_mode():
            result = metric(images, **kwargs)
        out.update(check_metric_result(get_component("metric", name), result))
        if bar is not None:
            bar.update(task, completed=images.shape[0])
    return out


PROBE_IMAGES = 20


def probe_metrics(metrics: dict[str, Any], context: MetricContext) -> None:
    """Call each metric once on :data:`PROBE_IMAGES` random images of the run's shape (with the
    run's untrained pipeline as context), so a metric that answers wrongly stops the run before
    training rather than after it."""
    pipe = context.pipeline
    g = torch.Generator().manual_seed(0)
    images = torch.rand(PROBE_IMAGES, pipe.channels, pipe.resolution, pipe.resolution, generator=g) * 2 - 1
    with torch.random.fork_rng(devices=[]):
        evaluate_images(images, metrics, context=context)


def load_image_folder(path: str | Path) -> torch.Tensor:
    """Every image under ``path`` (recursively) as one tensor in [-1, 1], at the first image's size."""
    from PIL import Image

    from .data import IMAGE_EXTENSIONS
    from .plugins import build

    root = Path(path)
    if not root.is_dir():
        raise DdpmkitError(f"--images: '{root}' is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DdpmkitError(f"--images: no PNG/JPEG/WebP images under '{root}'")
    with Image.open(files[0]) as first:
        size, gray = min(first.size), first.mode in ("1", "L", "LA", "F") or first.mode.startswith("I")
    ds = build("dataset", "image-folder", {"path": str(root), "resolution": size, "channels": 1 if gray else 3})
    return torch.stack([ds[i][0] for i in range(len(ds))])
