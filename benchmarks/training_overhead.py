"""ddpmkit's training step vs a hand-written PyTorch loop: same UNet, batch, optimizer, loss, data.

Both run in this process, interleaved in rounds, so machine noise hits both alike; prints the
median step time of each and their ratio (goal: ddpmkit ≤ 1.03× the plain loop).

    python benchmarks/training_overhead.py [--steps 40] [--rounds 3] [--preset laptop]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import ddpmkit
from ddpmkit.training import train


def plain_loop(config, steps: int) -> float:
    """The loop a user would write by hand (Algorithm 1, Adam, no framework)."""
    ds = ddpmkit.build("dataset", config.dataset.name, config.dataset.options)
    torch.manual_seed(config.seed)
    model = ddpmkit.build("predictor", config.predictor.name, config.predictor.options,
                          channels=ds.channels, resolution=ds.resolution)
    betas = ddpmkit.build("schedule", config.schedule.name, config.schedule.options)
    alpha_bar = torch.cumprod(1 - betas, 0).float()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = torch.utils.data.DataLoader(ds, batch_size=config.batch_size, shuffle=True, drop_last=True)
    it = iter(loader)
    t0 = None
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        try:
            x0, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x0, _ = next(it)
        t = torch.randint(0, len(betas), (x0.shape[0],))
        eps = torch.randn_like(x0)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        loss = F.smooth_l1_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def ddpmkit_loop(config, steps: int) -> float:
    """ddpmkit.train for 3 warm-up steps and for 3 + steps; the difference is ``steps`` steps."""
    times = []
    for n in (3, steps + 3):
        config.max_steps = n
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train(config, d, device="cpu", progress=False, sample_grid=False)
            times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--preset", default="laptop")
    args = p.parse_args()
    config = ddpmkit.preset_config(args.preset)
    config.loss.name, config.loss.options = "smoothl1", {}
    config.ema_decay, config.warmup_steps, config.epochs = None, 0, 1000
    config.checkpoint_every = 10**9  # one checkpoint at the end, outside the timed difference
    plain, ours = [], []
    for r in range(args.rounds):
        plain.append(plain_loop(config, args.steps))
        ours.append(ddpmkit_loop(config, args.steps))
        print(f"round {r + 1}: plain {plain[-1] * 1000:.1f} ms/step, ddpmkit {ours[-1] * 1000:.1f} ms/step")
    mp, mo = statistics.median(plain), statistics.median(ours)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset}, batch {config.batch_size}")
    print(f"median step: plain {mp * 1000:.1f} ms, ddpmkit {mo * 1000:.1f} ms, ratio ddpmkit/plain = {mo / mp:.3f}")


if __name__ == "__main__":
    main()
