"""How long the training loop waits for data, as a fraction of a training step.

For each dataset, the runner's own DataLoader settings (``ddpmkit.run.trainer.make_loader``) feed
batches of 32 to the seed's 32×32 UNet (Adam, SmoothL1, Algorithm 1). Waiting time (blocked in
``next(loader)``) and compute time are measured in the same loop, so the ratio holds on a noisy
machine. Goal: wait / step < 10%.

    python benchmarks/data_loading.py [--steps 20] [--cifar DIR] [--fashion-root DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import ddpmkit
from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.run.trainer import default_workers, make_loader

HERE = Path(__file__).resolve().parent


def measure(name: str, options: dict, steps: int, batch: int = 32) -> dict:
    t0 = time.perf_counter()
    ds = ddpmkit.build("dataset", name, options)
    build_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = ddpmkit.build("predictor", "unet2d", {}, channels=ds.channels, resolution=ds.resolution)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    loss_fn = ddpmkit.build("loss", "smoothl1")
    diffusion = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 300}))
    loader = make_loader(ds, batch, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    wait = compute = 0.0
    for i in range(steps + 2):
        a = time.perf_counter()
        x, _ = next(it)
        b = time.perf_counter()
        loss = diffusion.training_loss(model, x, loss_fn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        c = time.perf_counter()
        if i >= 2:  # the first batches include worker start-up
            wait += b - a
            compute += c - b
    return {"dataset": name, "images": len(ds), "workers": default_workers(ds), "build_s": build_s,
            "wait_ms": 1000 * wait / steps, "step_ms": 1000 * compute / steps, "ratio": wait / compute}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cifar", default=str(HERE.parents[1] / "shared" / "data" / "cifar10-test"))
    p.add_argument("--fashion-root", default="/tmp/ddpmkit-bench-data")
    args = p.parse_args()
    os.environ.setdefault("DDPMKIT_DATA", args.fashion_root)
    runs = [("fashion-mnist", {"data_root": args.fashion_root, "download": False}),
            ("cifar10", {"data_root": args.cifar, "download": False})]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; batch 32, seed 32×32 UNet")
    print(f"{'dataset':<14} {'images':>7} {'workers':>7} {'build s':>8} {'wait ms':>8} {'step ms':>8} {'wait/step':>9}")
    for name, opts in runs:
        try:
            r = measure(name, opts, args.steps)
        except ddpmkit.DdpmkitError as exc:
            print(f"{name:<14} skipped: {exc}")
            continue
        print(f"{r['dataset']:<14} {r['images']:>7} {r['workers']:>7} {r['build_s']:>8.1f} {r['wait_ms']:>8.2f} "
              f"{r['step_ms']:>8.0f} {r['ratio']:>9.2%}")


if __name__ == "__main__":
    main()
