"""Dataset ``aircraft``: FGVC-Aircraft 2013b through torchvision's ``FGVCAircraft``.

RGB; the 20-pixel copyright banner at the bottom of every image is cut off, then the image is
resized (shorter side) and center-cropped to the model resolution (64 by default).
Layout under ``DATA_ROOT``: ``fgvc-aircraft-2013b/data/{variants.txt, images_variant_train.txt,
images/*.jpg}`` (torchvision's).
"""

from __future__ import annotations

import os

import attrs

import ddpmkit
from ddpmkit.sdk.data import FileImageDataset, ImageDatasetConfig, readable_files, select

BANNER = 20


@attrs.define(kw_only=True)
class AircraftConfig(ImageDatasetConfig):
    """Options of ``aircraft`` (plus the common ones).

    resolution: default 64 (the seed's Aircraft model).
    split: ``train``, ``val``, ``trainval``, ``test`` or ``all`` (trainval + test: the seed's 10,000
        images). Default ``all``.
    annotation_level: ``variant``, ``family`` or ``manufacturer``. Default ``variant``.
    download: let torchvision download the archive (2.6 GB) when missing. Default True.
    max_bad_fraction: stop when more than this fraction of the images cannot be decoded
        (fewer are skipped with a warning each). Default 0.01.
    """

    resolution: int = attrs.field(default=64, validator=attrs.validators.ge(4))
    split: str = attrs.field(default="all", validator=attrs.validators.in_(("train", "val", "trainval", "test", "all")))
    annotation_level: str = attrs.field(default="variant",
                                        validator=attrs.validators.in_(("variant", "family", "manufacturer")))
    download: bool = True
    max_bad_fraction: float = attrs.field(default=0.01, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])


def _load(config: AircraftConfig, split: str):
    from torchvision.datasets import FGVCAircraft

    root = config.root()
    kwargs = dict(split=split, annotation_level=config.annotation_level)
    try:
        ds = FGVCAircraft(str(root), download=False, **kwargs)
    except RuntimeError:
        ds = None
        if config.download:
            try:
                ds = FGVCAircraft(str(root), download=True, **kwargs)
            except Exception:
                ds = None
        if ds is None:
            raise ddpmkit.DdpmkitError(
                f"FGVC-Aircraft not found under {root}: expected {root}/fgvc-aircraft-2013b/data/ with "
                f"images/ and images_{config.annotation_level}_{split}.txt (unpack fgvc-aircraft-2013b.tar.gz "
                "there, or set dataset.data_root)"
            ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ddpmkit.DdpmkitError(f"FGVC-Aircraft under {root} has a wrong layout: {exc}") from None
    return ds


def aircraft(config: AircraftConfig):
    parts = [_load(config, s) for s in (("trainval", "test") if config.split == "all" else (config.split,))]
    files = [f for ds in parts for f in ds._image_files]
    labels = [y for ds in parts for y in ds._labels]
    missing = [f for f in files[:1] + files[-1:] if not os.path.isfile(f)]
    if missing:
        raise ddpmkit.DdpmkitError(f"FGVC-Aircraft lists {missing[0]}, which is not there: wrong layout or incomplete unpacking")
    keep = select(labels, parts[0].classes, config, f"aircraft at {config.root()}")
    files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    good = readable_files(files, config.max_bad_fraction, f"aircraft at {config.root()}")
    return FileImageDataset([files[i] for i in good], [labels[i] for i in good], parts[0].classes, config,
                            channels=3, crop_bottom=BANNER)


@ddpmkit.hookimpl
def register_datasets(register):
    register("aircraft", aircraft, AircraftConfig, "FGVC-Aircraft 2013b, banner cropped (torchvision)")
