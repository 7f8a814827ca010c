"""Evaluating samples with metric plugins: from a checkpoint (sampling first) or a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from .errors import DdpmkitError
from .plugins import get_component


def build_metrics(names: list[str] | tuple[str, ...], options: dict[str, Any], device) -> dict[str, Any]:
    """Metric plugins by name; each gets the options its config class knows (unknown ones → error)."""
    metrics, used = {}, set()
    for name in names:
        comp = get_component("metric", name)
        fields = {f.name for f in attrs.fields(comp.config_class)} if comp.config_class else set()
        mine = {k: v for k, v in options.items() if k in fields}
        used |= set(mine)
        metrics[name] = comp.build(mine, device=device)
    unused = sorted(set(options) - used)
    if unused:
        raise DdpmkitError(f"option(s) {', '.join('metric.' + u for u in unused)} match none of the metrics "
                           f"{', '.join(names)}")
    return metrics


def evaluate_images(images: torch.Tensor, metrics: dict[str, Any], bar=None) -> dict[str, float]:
    """Run every metric on ``images`` (N, C, H, W) in [-1, 1] in inference mode; one flat dict.

    ``bar``: a rich Progress; metrics whose ``__call__`` takes ``progress`` report images done.
    """
    import inspect

    out: dict[str, float] = {}
    for name, metric in metrics.items():
        kwargs = {}
        if bar is not None:
            task = bar.add_task(name, total=images.shape[0], info=f"{images.shape[0]} images")
            if "progress" in inspect.signature(metric.__call__).parameters:
                kwargs["progress"] = lambda k, _t=task: bar.update(_t, completed=k)
        with torch.inference_mode():
            out.update(metric(images, **kwargs))
        if bar is not None:
            bar.update(task, completed=images.shape[0])
    return out


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
        size, gray = min(first.size), first.mode in ("1", "L", "LA", "I", "F")
    ds = build("dataset", "image-folder", {"path": str(root), "resolution": size, "channels": 1 if gray else 3})
    return torch.stack([ds[i][0] for i in range(len(ds))])
