"""ddpmkit's training step vs a hand-written PyTorch loop: same UNet, batch, optimizer, loss, data.

Both run in this process, interleaved in rounds, so machine noise hits both alike; prints the
median step time of each and their ratio (goal: ddpmkit ≤ 1.03× the plain loop), and each one's
peak memory: the rise of the process's peak resident memory while it runs (on the CPU).

    python benchmarks/training_overhead.py [--steps 40] [--rounds 3] [--preset tiny]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from plain_loop import plain_loop  # benchmarks/plain_loop.py, beside this script
from rounds import alternate, with_peak  # benchmarks/rounds.py

import ddpmkit
from ddpmkit.run.trainer import train


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
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    config = ddpmkit.preset_config(args.preset)
    config.loss.name, config.loss.options = "smoothl1", {}
    config.ema_decay, config.warmup_steps, config.epochs = None, 0, 1000
    config.checkpoint_every = 10**9  # one checkpoint at the end, outside the timed difference
    per_step = alternate({"plain": lambda: plain_loop(config, args.steps),
                          "ddpmkit": lambda: ddpmkit_loop(config, args.steps)},
                         args.rounds, measure=with_peak,
                         show=lambda v: f"{v[0] * 1000:.1f} ms/step, peak +{v[1]:.0f} MiB")
    mp, mo = (statistics.median(v[0] for v in per_step[k]) for k in ("plain", "ddpmkit"))
    # Round 1's rise also holds first-use costs (the dataset, lazily loaded code): medians compare.
    pp, po = (statistics.median(v[1] for v in per_step[k]) for k in ("plain", "ddpmkit"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset}, batch {config.batch_size}")
    print(f"median step: plain {mp * 1000:.1f} ms, ddpmkit {mo * 1000:.1f} ms, ratio ddpmkit/plain = {mo / mp:.3f}")
    print(f"peak memory (median rise): plain +{pp:.0f} MiB, ddpmkit +{po:.0f} MiB")


if __name__ == "__main__":
    main()
