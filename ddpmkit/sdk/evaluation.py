"""Evaluating samples with metric plugins: from a checkpoint (sampling first) or a folder of images.

(Metrics are built with ``ddpmkit.run.assembly.build_many("metric", names, options, device=...)``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from ddpmkit.errors import DdpmkitError
from ddpmkit.sdk.contract import check_metric_result
from ddpmkit.sdk.data import IMAGE_EXTENSIONS
from ddpmkit.sdk.metrics import from_uint8
from ddpmkit.sdk.registry import build, get_component, takes_keyword


@attrs.frozen
class MetricContext:
    """What a metric that asks for ``context`` receives.

    pipeline: the trained :class:`~ddpmkit.run.pipeline.Pipeline` (model, diffusion, ``sample``), or
        ``None`` when only images are evaluated (``ddpmkit evaluate --images``).
    dataset: the run's training dataset (items ``(image, label)`` in [-1, 1]), or ``None``.
    seed: the run's seed, for metrics that draw their own samples.
    labels: for images drawn from a class-conditional model, the class each was asked for.
    """

    pipeline: Any = None
    dataset: Any = None
    seed: int = 0
    labels: Any = None  # the class of each image a class-conditional model was asked for ((N,) long), or None


_takes = takes_keyword


def evaluate_images(images: torch.Tensor, metrics: dict[str, Any], bar: Any = None,
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

    root = Path(path)
    if not root.is_dir():
        raise DdpmkitError(f"--images: '{root}' is not a folder of images or an .npz file")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DdpmkitError(f"--images: no PNG/JPEG/WebP images under '{root}'")
    with Image.open(files[0]) as first:
        size, gray = min(first.size), first.mode in ("1", "L", "LA", "F") or first.mode.startswith("I")
    ds = build("dataset", "image-folder", {"path": str(root), "resolution": size, "channels": 1 if gray else 3})
    return torch.stack([ds[i][0] for i in range(len(ds))])


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (and labels) from a guided-diffusion-style ``.npz``: ``arr_0`` uint8 ``(N, H, W, C)`` →
    float ``(N, C, H, W)`` in [-1, 1] (u/127.5 − 1); ``arr_1``, when present, the ``(N,)`` class labels."""
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
        arr = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise DdpmkitError(f"--images: '{path}' is not an .npz of images with arr_0 ({exc})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DdpmkitError(f"--images: '{path}' arr_0 must be uint8 (N, H, W, C) with C 1 or 3, got {arr.dtype} "
                           f"{tuple(arr.shape)}")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(arr)):
        raise DdpmkitError(f"--images: '{path}' arr_1 must hold one label per image, got shape {tuple(labels.shape)}")
    images = from_uint8(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def load_images(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``ddpmkit evaluate --images`` reads: a folder of images (:func:`load_image_folder`; no labels)
    or an ``.npz`` file (:func:`load_npz`; labels when it holds ``arr_1``)."""
    if Path(path).is_file() and str(path).endswith(".npz"):
        return load_npz(path)
    return load_image_folder(path), None
