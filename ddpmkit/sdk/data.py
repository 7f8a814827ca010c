"""Helpers for dataset plugins: the options every dataset understands, and image pipelines.

A dataset plugin's config class subclasses :class:`ImageDatasetConfig` to get the common
options (``data_root``, ``resolution``, ``classes``, ``limit``, ``hflip``), then builds either

* a :class:`TensorImageDataset` from images already in memory (MNIST, CIFAR-10 pickles): the
  whole set is scaled and resized once, so a batch costs one indexing operation; or
* a :class:`FileImageDataset` from image files (FGVC-Aircraft, folders): each item is decoded
  with Pillow, resized and center-cropped when it is loaded (in DataLoader workers).

Items are ``(image, label)`` with ``image`` a float tensor ``(C, R, R)`` in [-1, 1].
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F

from ddpmkit.errors import DdpmkitError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def default_data_root() -> Path:
    """``$DDPMKIT_DATA``, else ``$XDG_CACHE_HOME/ddpmkit/datasets`` (``~/.cache/ddpmkit/datasets``)."""
    if os.environ.get("DDPMKIT_DATA"):
        return Path(os.environ["DDPMKIT_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ddpmkit" / "datasets"


def folder_fingerprint(path: str | os.PathLike) -> str | None:
    """A digest of every file under ``path`` (relative name, size, modification time): changes when a
    file is added, removed, replaced or edited. ``None`` if ``path`` is not a folder (or a file's
    digest of its size and time, if it is a file)."""
    import hashlib

    root = Path(path)
    if not root.exists():
        return None
    entries = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in entries:
        st = p.stat()
        h.update(f"{p.relative_to(root) if p != root else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _opt_ge1(inst: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.define(kw_only=True)
class ImageDatasetConfig:
    """Options every dataset understands.

    data_root: where the dataset lives or is downloaded to. Default: ``default_data_root()``.
    resolution: side of the square images the model sees, in pixels. Default 32.
    classes: keep only these classes, by name or index (e.g. ``airplane,ship`` or ``3,7``).
        Default: all.
    limit: keep at most this many images (the first ones, after the class filter). Default: all.
    hflip: flip each image horizontally with probability 1/2 when it is loaded. Default False.
    """

    data_root: str | None = None
    resolution: int = attrs.field(default=32, validator=attrs.validators.ge(4))
    classes: tuple[str, ...] = attrs.field(default=(), converter=lambda v: tuple(str(c) for c in v))
    limit: int | None = attrs.field(default=None, validator=_opt_ge1)
    hflip: bool = False

    def root(self) -> Path:
        return Path(self.data_root).expanduser() if self.data_root else default_data_root()


def select(labels: Sequence[int], class_names: Sequence[str], config: ImageDatasetConfig, dataset: str) -> list[int]:
    """Indices kept by ``config.classes`` and ``config.limit``; unknown class → DdpmkitError."""
    wanted: set[int] = set()
    for c in config.classes:
        if c in class_names:
            wanted.add(list(class_names).index(c))
        elif c.isdigit() and int(c) < len(class_names):
            wanted.add(int(c))
        else:
            raise DdpmkitError(f"class '{c}' is not a class of {dataset}; classes: {', '.join(map(str, class_names))}")
    idx = [i for i, y in enumerate(labels) if not wanted or int(y) in wanted]
    if config.limit is not None:
        idx = idx[: config.limit]
    if not idx:
        raise DdpmkitError(f"{dataset}: no images left after the class filter / limit")
    return idx


def fit_square(x: torch.Tensor, resolution: int, pad_small: bool = False) -> torch.Tensor:
    """Float images ``(N, C, H, W)`` in [-1, 1] → ``(N, C, R, R)``.

    Resizes the shorter side to ``R`` (antialiased bilinear) and center-crops. With
    ``pad_small``, images up to 8 px smaller than ``R`` are padded with -1 (background)
    instead, as the seed padded MNIST's 28×28 digits to 32×32.
    """
    n, c, h, w = x.shape
    if pad_small and h == w and h <= resolution <= h + 8:
        p = resolution - h
        return F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0)
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        x = x[:, :, top: top + resolution, left: left + resolution]
    return x.clamp(-1, 1)


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory images, preprocessed once.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, C, H, W)``, or ``(N, H, W, C)`` with ``channels_last``.
        labels: ``(N,)`` ints.
        classes: class names.
        config: the common options (resolution, hflip); the class filter and limit are applied
            by the caller through :func:`select`.
        pad_small: pad instead of resize when only a few pixels are missing (MNIST 28 → 32).
    """

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: Any, classes: Sequence[str], config: ImageDatasetConfig,
                 pad_small: bool = False, channels_last: bool = False, chunk: int = 4096):
        images = torch.as_tensor(images)
        if images.ndim == 3:
            images = images.unsqueeze(1)
        elif channels_last:
            images = images.permute(0, 3, 1, 2)
        out = []
        for i in range(0, len(images), chunk):  # bounded memory while converting
            x = images[i: i + chunk].float() / 127.5 - 1.0
            out.append(fit_square(x, config.resolution, pad_small))
        self.images = torch.cat(out).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.classes = list(classes)
        self.hflip = config.hflip
        self.channels, self.resolution = self.images.shape[1], config.resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]

    def __getitems__(self, idx: list[int]):
        """Batched fetch used by the DataLoader: one gather instead of ``len(idx)`` calls."""
        x, y = self.images[idx], self.labels[idx]
        if self.hflip:
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return list(zip(x, y))


class FileImageDataset(torch.utils.data.Dataset):
    """Images decoded from files when loaded.

    Args:
        files: image paths.
        labels: one int per file.
        classes: class names.
        config: the common options.
        channels: 1 (grayscale) or 3 (RGB); other modes are converted, and the conversion of
            grayscale to RGB is announced once.
        crop_bottom: pixels to cut off the bottom before resizing (FGVC-Aircraft's banner).
    """

    in_memory = False

    def __init__(self, files: Sequence[str | os.PathLike], labels: Sequence[int], classes: Sequence[str],
                 config: ImageDatasetConfig, channels: int = 3, crop_bottom: int = 0):
        if channels not in (1, 3):
            raise DdpmkitError(f"channels must be 1 or 3, got {channels}")
        self.files = [str(f) for f in files]
        self.labels = list(labels)
        self.classes = list(classes)
        self.channels, self.resolution = channels, config.resolution
        self.hflip, self.crop_bottom = config.hflip, crop_bottom
        self._told_gray = False

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: str) -> torch.Tensor:
        """Decode, convert, crop and resize one file → ``(C, R, R)`` in [-1, 1]."""
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(path) as img:
            orig_h = img.size[1]
            gray = img.mode in ("1", "L", "LA", "F") or img.mode.startswith("I")
            if self.channels == 3 and gray and not self._told_gray:
                self._told_gray = True
                warnings.warn(f"grayscale images (first: {path}) are converted to RGB for a 3-channel model",
                              stacklevel=2)
            if img.format == "JPEG":  # decode at reduced size when the file is much larger (fast)
                img.draft(img.mode, (self.resolution * 2, self.resolution * 2 + self.crop_bottom))
            if self.crop_bottom:  # in original pixels; draft() may have scaled the image down
                w, h = img.size
                img = img.crop((0, 0, w, max(1, h - round(self.crop_bottom * h / orig_h))))
            if img.mode.startswith("I") or img.mode == "F":  # 16-bit integers, 32-bit floats
                x = wide_gray_to_unit(img, path) * 2 - 1
                x = x.expand(self.channels, -1, -1)
            else:
                x = pil_to_tensor(img.convert("RGB" if self.channels == 3 else "L")).float() / 127.5 - 1.0
        return fit_square(x.unsqueeze(0), self.resolution)[0]

    def __getitem__(self, i: int):
        x = self.load(self.files[i])
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def wide_gray_to_unit(img: Image.Image, path: str | os.PathLike) -> torch.Tensor:
    """A 16-bit (``I;16*``, or ``I`` holding 16-bit values) or 32-bit float (``F``) grayscale image as
    ``(1, H, W)`` in [0, 1], scaled by its bit depth (Pillow's own conversion to 8 bits clips at 255,
    which turns a 16-bit image white). Float images must already lie in [0, 1]."""
    import numpy as np

    arr = np.asarray(img, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode == "F":
        if lo < 0 or hi > 1:
            raise DdpmkitError(f"{path}: a 32-bit float image with values in [{lo:.4g}, {hi:.4g}]; float images "
                               "must lie in [0, 1] (or save it as 8- or 16-bit)")
        scale = 1.0
    elif img.mode.startswith("I;16") or 255 < hi <= 65535:
        scale = 65535.0
    elif lo >= 0 and hi <= 255:
        scale = 255.0
    else:
        raise DdpmkitError(f"{path}: a 32-bit integer image with values in [{lo:.0f}, {hi:.0f}]; ddpmkit reads "
                           "8- and 16-bit images (and float images in [0, 1])")
    return torch.from_numpy(arr / scale).float().unsqueeze(0)


def readable_files(files: Sequence[str], max_bad_fraction: float, what: str) -> list[int]:
    """Fully decode every file; warn once per bad file, then once with the count.

    Returns the indices of the good files; more than ``max_bad_fraction`` bad → DdpmkitError.
    """
    from PIL import Image

    good, bad = [], []
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img.draft(img.mode, (64, 64)) if img.format == "JPEG" else None
                img.load()
            good.append(i)
        except Exception as exc:  # PIL raises many types for broken files
            bad.append(f)
            warnings.warn(f"skipping unreadable image {f}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                          stacklevel=2)
    if bad:
        frac = len(bad) / max(1, len(files))
        if frac > max_bad_fraction:
            raise DdpmkitError(f"{what}: {len(bad)} of {len(files)} images are unreadable ({frac:.0%} > "
                               f"max_bad_fraction {max_bad_fraction:.0%}); first: {bad[0]}")
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image(s) of {len(files)}", stacklevel=2)
    return good


def item_image(item: Any) -> torch.Tensor:
    """The image of a dataset item: the item itself, or the first element of an ``(image, label)`` pair."""
    return item[0] if isinstance(item, (tuple, list)) else item
