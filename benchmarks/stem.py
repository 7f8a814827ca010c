"""What a training step of the small U-Net costs at MNIST's own 28×28, with and without the space-to-depth
stem (``unet2d`` ``patch_size``/``pad``), beside the 16×16 tiny preset, and the variants the laptop
preset's ablation tried.

Each configuration trains the tiny preset's network ((32, 64, 64), attention at 8, one layer a block,
batch 64, unless the row says otherwise; Adam, SmoothL1, T = 1000) for the same number of steps on
random data; the configurations take turns, round by round, so the ratios hold on a noisy machine.

    python benchmarks/stem.py [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

import ddpmkit
from ddpmkit.diffusion import GaussianDiffusion

TINY = ddpmkit.preset_config("tiny").predictor.options  # the 16×16 preset's network
STEM = {"patch_size": 2, "pad": 2}
CONFIGS = {  # name: (side, unet2d options over TINY, batch)
    "16×16 (tiny preset)": (16, {}, 64),
    "28×28, plain (levels 28, 14, 7; attention at 7)": (28, {"attention_resolutions": (7,)}, 64),
    "28×28, patch_size 2, pad 2 (inside: 16, 8, 4)": (28, STEM, 64),
    "28×28, patch_size 2, pad 2, batch 32": (28, STEM, 32),
    "28×28, patch 2, pad 2, class embedding": (28, {**STEM, "num_classes": 10}, 64),
    "28×28, patch 4, pad 2, (64, 128, 128), attention at 4": (28, {"patch_size": 4, "pad": 2,
                                                                    "block_out_channels": (64, 128, 128),
                                                                    "attention_resolutions": (4,)}, 64),
}


def network(resolution: int, options: dict):
    options = dict(options)
    classes = options.pop("num_classes", None)
    extra = {"num_classes": classes} if classes else {}
    return ddpmkit.build("predictor", "unet2d", {**TINY, **options}, channels=1, resolution=resolution, **extra)


def step_time(resolution: int, options: dict, steps: int, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = network(resolution, options)
    labels = {"class_labels": torch.randint(0, 11, (batch,))} if "num_classes" in options else {}
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = ddpmkit.build("loss", "smoothl1")
    diffusion = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 1000}))
    x0 = torch.rand(batch, 1, resolution, resolution) * 2 - 1
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        loss = loss_fn(model(diffusion.q_sample(x0, t, noise), t, **labels), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    best = {name: float("inf") for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (res, opts, batch) in CONFIGS.items():
            best[name] = min(best[name], step_time(res, opts, args.steps, batch))
    base = best["16×16 (tiny preset)"]
    params = {name: sum(p.numel() for p in network(r, o).parameters()) for name, (r, o, _) in CONFIGS.items()}
    print(f"{'configuration':56s} {'s/step':>8s} {'× 16×16':>8s} {'params':>9s}")
    for name in CONFIGS:
        print(f"{name:56s} {best[name]:8.3f} {best[name] / base:8.2f} {params[name]:9d}")


if __name__ == "__main__":
    main()
