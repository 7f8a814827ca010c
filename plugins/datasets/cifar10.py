"""Dataset ``cifar10``: torchvision's CIFAR10 (python pickles), or a folder of class subfolders.

``DATA_ROOT/cifar-10-batches-py`` (torchvision's layout) is read when present; otherwise, when
``DATA_ROOT`` holds one subfolder per CIFAR-10 class (``airplane/``, ``automobile/``, ...), those
images are read.
"""

from __future__ import annotations

import attrs

import ddpmkit
from ddpmkit.sdk.data import (
    IMAGE_EXTENSIONS,
    FileImageDataset,
    ImageDatasetConfig,
    TensorImageDataset,
    readable_files,
    select,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@attrs.define(kw_only=True)
class Cifar10Config(ImageDatasetConfig):
    """Options of ``cifar10`` (plus the common ones).

    split: ``train`` (50,000) or ``test`` (10,000); pickles only. Default ``train``.
    download: let torchvision download the pickles (163 MB) when missing and no class folders are there. Default True.
    max_bad_fraction: class folders only: stop when more than this fraction of the images cannot be decoded. Default 0.01.
    """

    split: str = attrs.field(default="train", validator=attrs.validators.in_(("train", "test")))
    download: bool = True
    max_bad_fraction: float = attrs.field(default=0.01, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])


def cifar10(config: Cifar10Config):
    from torchvision.datasets import CIFAR10

    root = config.root()
    train = config.split == "train"
    if (root / "cifar-10-batches-py").is_dir():
        try:
            ds = CIFAR10(str(root), train=train, download=False)
        except RuntimeError as exc:
            raise ddpmkit.DdpmkitError(f"CIFAR-10 pickles under {root} are incomplete or corrupt: {exc}") from None
        keep = select(ds.targets, ds.classes, config, "cifar10")
        return TensorImageDataset(ds.data[keep], [ds.targets[i] for i in keep], ds.classes, config, channels_last=True)
    folders = [root / c for c in CLASSES]
    if all(f.is_dir() for f in folders):
        files, labels = [], []
        for label, folder in enumerate(folders):
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(f)
                    labels.append(label)
        if not files:
            raise ddpmkit.DdpmkitError(f"CIFAR-10 class folders under {root} hold no images")
        keep = select(labels, CLASSES, config, f"cifar10 at {root}")
        files, labels = [str(files[i]) for i in keep], [labels[i] for i in keep]
        good = readable_files(files, config.max_bad_fraction, f"cifar10 at {root}")
        return FileImageDataset([files[i] for i in good], [labels[i] for i in good], CLASSES, config, channels=3)
    if config.download:
        try:
            ds = CIFAR10(str(root), train=train, download=True)
            keep = select(ds.targets, ds.classes, config, "cifar10")
            return TensorImageDataset(ds.data[keep], [ds.targets[i] for i in keep], ds.classes, config,
                                      channels_last=True)
        except ddpmkit.DdpmkitError:
            raise
        except Exception:
            pass
    present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    missing = [f.name for f in folders if not f.is_dir()]
    hint = f" (class folders missing: {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})" if present else ""
    raise ddpmkit.DdpmkitError(
        f"CIFAR-10 not found under {root}: expected {root / 'cifar-10-batches-py'} (torchvision's pickles) or one "
        f"folder per class{hint}"
    )


@ddpmkit.hookimpl
def register_datasets(register):
    register("cifar10", cifar10, Cifar10Config, "CIFAR-10 (torchvision pickles or class folders)")
