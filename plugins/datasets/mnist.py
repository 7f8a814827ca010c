"""Datasets ``mnist`` and ``fashion-mnist``: the full 60k/10k sets through torchvision.

Files are looked for, gzipped or not, in ``DATA_ROOT/<MNIST|FashionMNIST>/raw/`` (torchvision's
layout), directly in ``DATA_ROOT``, and for Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``
(Debian's ``dataset-fashion-mnist``). Missing files are downloaded by torchvision when
``download`` is on and the network allows; otherwise one line says which files to put where.
28×28 digits are padded to 32×32 with background (as the seed did); other resolutions resize.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import attrs

import ddpmkit
from ddpmkit.sdk.data import ImageDatasetConfig, TensorImageDataset, default_data_root, select

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@attrs.define(kw_only=True)
class MnistConfig(ImageDatasetConfig):
    """Options of ``mnist`` / ``fashion-mnist`` (plus the common ones of ImageDatasetConfig).

    split: ``train`` (60,000 images) or ``test`` (10,000). Default ``train``.
    download: let torchvision download missing files. Default True.
    """

    split: str = attrs.field(default="train", validator=attrs.validators.in_(("train", "test")))
    download: bool = True


def _stems(split: str) -> list[str]:
    prefix = "train" if split == "train" else "t10k"
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None if it all exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def prepare(tv_name: str, root: Path, split: str, extra_dirs: list[Path]) -> Path | None:
    """Find the IDX files and lay them out as torchvision expects; return the root to use."""
    stems = _stems(split)
    raw = root / tv_name / "raw"
    if all((raw / s).exists() for s in stems):
        return root
    found = {}
    for stem in stems:
        for d in (raw, root, *extra_dirs):
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    found[stem] = d / name
                    break
            if stem in found:
                break
    if len(found) < len(stems):
        return None
    target_root = root if _writable(raw) else default_data_root()
    target = target_root / tv_name / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for stem, src in found.items():
        dst = target / stem
        if dst.exists():
            continue
        tmp = dst.with_suffix(".tmp")
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst)
    return target_root


def make(tv_cls_name: str, label: str, extra_dirs: list[Path]):
    def factory(config: MnistConfig):
        import torchvision.datasets as tvd

        tv_cls = getattr(tvd, tv_cls_name)
        root = config.root()
        use_root = prepare(tv_cls_name, root, config.split, extra_dirs)
        if use_root is None:
            if config.download:
                missing = _first_missing(root / tv_cls_name / "raw")
                try:
                    tv_cls(str(root), train=config.split == "train", download=True)
                    use_root = root
                except Exception:
                    use_root = None
                    if missing is not None:  # a failed download leaves no folders behind
                        shutil.rmtree(missing, ignore_errors=True)
            if use_root is None:
                names = ", ".join(s + ".gz" for s in _stems(config.split))
                raise ddpmkit.DdpmkitError(
                    f"{label} {config.split} files not found and could not be downloaded: put {names} "
                    f"in {root / tv_cls_name / 'raw'} (or set dataset.data_root to their folder)"
                )
        # torchvision checks that both splits are present; one split is enough here.
        stems = _stems(config.split)
        one_split = type(tv_cls.__name__, (tv_cls,), {
            "_check_exists": lambda self: all(os.path.isfile(os.path.join(self.raw_folder, s)) for s in stems)})
        ds = one_split(str(use_root), train=config.split == "train", download=False)
        keep = select(ds.targets.tolist(), [c.split(" - ")[-1] for c in ds.classes], config, label)
        return TensorImageDataset(ds.data[keep], ds.targets[keep], ds.classes, config, pad_small=True)

    return factory


@ddpmkit.hookimpl
def register_datasets(register):
    register("mnist", make("MNIST", "mnist", []), MnistConfig, "MNIST 60k/10k handwritten digits (torchvision)")
    register("fashion-mnist", make("FashionMNIST", "fashion-mnist", [DEBIAN_FASHION]), MnistConfig,
             "Fashion-MNIST 60k/10k (torchvision; also Debian's dataset-fashion-mnist)")
