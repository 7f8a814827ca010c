"""Dataset ``image-folder``: every PNG/JPEG/WebP image under a folder, recursively.

Any size and mode; converted to ``channels`` (1 or 3), resized (shorter side) and center-cropped
to the resolution. Labels are the first-level subfolder (0 for files at the top). Every file is
decoded once when the dataset is built: unreadable ones are skipped with a warning naming each
and a count at the end, or the run stops when more than ``max_bad_fraction`` of them are bad.
"""

from __future__ import annotations

from pathlib import Path

import attrs

import ddpmkit
from ddpmkit.sdk.data import IMAGE_EXTENSIONS, FileImageDataset, ImageDatasetConfig, readable_files, select


@attrs.define(kw_only=True)
class ImageFolderConfig(ImageDatasetConfig):
    """Options of ``image-folder`` (plus the common ones).

    path: the folder (required; ``data_root`` is accepted too).
    channels: 1 (grayscale) or 3 (RGB). Default 3.
    max_bad_fraction: stop when more than this fraction of the files cannot be decoded. Default 0.01.
    """

    path: str | None = None
    channels: int = attrs.field(default=3, validator=attrs.validators.in_((1, 3)))
    max_bad_fraction: float = attrs.field(default=0.01, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])


def image_folder(config: ImageFolderConfig):
    if not (config.path or config.data_root):
        raise ddpmkit.DdpmkitError("image-folder needs a folder: --set dataset.path=DIR")
    root = Path(config.path or config.data_root).expanduser()
    if not root.is_dir():
        raise ddpmkit.DdpmkitError(f"image-folder: '{root}' is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ddpmkit.DdpmkitError(f"image-folder: no PNG/JPEG/WebP images under '{root}'")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(p.relative_to(root).parts[0], 0) if len(p.relative_to(root).parts) > 1 else 0 for p in files]
    keep = select(labels, classes or ["(all)"], config, "image-folder")
    files, labels = [str(files[i]) for i in keep], [labels[i] for i in keep]
    good = readable_files(files, config.max_bad_fraction, f"image-folder '{root}'")
    if not good:
        raise ddpmkit.DdpmkitError(f"image-folder: no readable images under '{root}'")
    return FileImageDataset([files[i] for i in good], [labels[i] for i in good], classes or ["(all)"], config,
                            channels=config.channels)


@ddpmkit.hookimpl
def register_datasets(register):
    register("image-folder", image_folder, ImageFolderConfig, "any folder of PNG/JPEG/WebP images, recursively")
