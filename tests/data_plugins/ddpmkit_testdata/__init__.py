"""Third-party datasets as a plugin author would write them, at shapes the built-ins do not have:

* ``stripes``: 24×24 RGB with labels and class names (three stripe directions);
* ``blobs``: 32×32 gray, no labels (bare image tensors);
* ``odd-36``: 36×36 gray with labels but no class count (items ``(image, 0)``): not usable for
  class-conditioning, so runs on it are unconditional;
* ``tiny-20``: 20×20 RGB, labelled, that states its recommended settings through the contract
  (``recommended``: unconditional, no stem).

tests/test_defaults_follow_data.py registers it in-process (``ddpmkit.register_plugin``) and trains on
each with ``ddpmkit run --dataset NAME`` alone.
"""

import math

import torch

import ddpmkit


class Shapes(torch.utils.data.Dataset):
    def __init__(self, side: int, channels: int, labelled: bool, classes=None, count: int = 48):
        self.side, self.channels, self.labelled, self.count = side, channels, labelled, count
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        y = i % 3
        u = torch.linspace(-1, 1, self.side)
        grid = [u.view(-1, 1).expand(self.side, self.side), u.view(1, -1).expand(self.side, self.side)]
        wave = torch.sin(4 * math.pi * (grid[0] if y == 0 else grid[1] if y == 1 else (grid[0] + grid[1]) / 2))
        x = (0.8 * wave + 0.2 * torch.rand(self.side, self.side, generator=g) - 0.1).clamp(-1, 1)
        x = x.expand(self.channels, -1, -1).clone()
        return (x, y) if self.labelled else x


class Recommending(Shapes):
    recommended = {"class_conditional": False, "predictor": {"patch_size": 1, "pad": 2}}


@ddpmkit.hookimpl
def register_datasets(register):
    register("stripes", lambda: Shapes(24, 3, True, ["vertical", "horizontal", "diagonal"]), None,
             "24×24 RGB stripes in three labelled directions")
    register("blobs", lambda: Shapes(32, 1, False), None, "32×32 gray, no labels")
    register("odd-36", lambda: Shapes(36, 1, True), None, "36×36 gray, labels without a class count")
    register("tiny-20", lambda: Recommending(20, 3, True, ["a", "b", "c"]), None,
             "20×20 RGB that recommends its own settings")
