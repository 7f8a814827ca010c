"""What a training step of the laptop U-Net costs at MNIST's own 28×28, with and without the space-to-depth
stem (``unet2d`` ``patch_size``/``pad``), beside the 16×16 laptop preset.

Each configuration trains the laptop network ((32, 64, 64), attention at 8, one layer a block, batch 64,
Adam, SmoothL1, T = 1000) for the same number of steps on random data; the configurations take turns,
round by round, so the ratios hold on a noisy machine.

    python benchmarks/stem.py [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

import ddpmkit
from ddpmkit.diffusion import GaussianDiffusion

LAPTOP = {"block_out_channels": (32, 64, 64), "attention_resolutions": (8,), "layers_per_block": 1,
          "norm_num_groups": 8}
CONFIGS = {
    "16×16 (laptop preset)": (16, {}),
    "28×28, plain (levels 28, 14, 7; attention at 7)": (28, {"attention_resolutions": (7,)}),
    "28×28, patch_size 2, pad 2 (inside: 16, 8, 4)": (28, {"patch_size": 2, "pad": 2}),
}


def step_time(resolution: int, options: dict, steps: int, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = ddpmkit.build("predictor", "unet2d", {**LAPTOP, **options}, channels=1, resolution=resolution)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = ddpmkit.build("loss", "smoothl1")
    diffusion = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 1000}))
    x0 = torch.rand(batch, 1, resolution, resolution) * 2 - 1
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        loss = loss_fn(model(diffusion.q_sample(x0, t, noise), t), noise)
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
        for name, (res, opts) in CONFIGS.items():
            best[name] = min(best[name], step_time(res, opts, args.steps))
    base = best["16×16 (laptop preset)"]
    params = {name: sum(p.numel() for p in ddpmkit.build("predictor", "unet2d", {**LAPTOP, **o}, channels=1,
                                                          resolution=r).parameters())
              for name, (r, o) in CONFIGS.items()}
    print(f"{'configuration':50s} {'s/step':>8s} {'× 16×16':>8s} {'params':>9s}")
    for name in CONFIGS:
        print(f"{name:50s} {best[name]:8.3f} {best[name] / base:8.2f} {params[name]:9d}")


if __name__ == "__main__":
    main()
