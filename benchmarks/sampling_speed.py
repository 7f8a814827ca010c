"""DDPM sampling: ddpmkit vs diffusers' DDPMPipeline with the same UNet weights, betas and T.

Also DDIM with 50 steps against DDPM with all T steps, with the samples' quality measured by the
offline ``digit-score`` (meaningful for a checkpoint trained on digits). Runs alternate in the
same process so that the ratios hold on a noisy machine; peak memory is reported on CUDA.

    python benchmarks/sampling_speed.py [CHECKPOINT] [-n 64] [--rounds 2] [--device auto]

Without a checkpoint, a randomly initialised laptop-preset UNet is timed (speed only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import ddpmkit
from ddpmkit.export import export_diffusers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    from diffusers import DDPMPipeline

    dev = ddpmkit.resolve_device(args.device)
    if args.checkpoint:
        pipe = ddpmkit.load_checkpoint(args.checkpoint, device=dev)
    else:
        config = ddpmkit.preset_config("laptop")
        config.max_steps, config.ema_decay = 1, None
        with tempfile.TemporaryDirectory() as d:
            ddpmkit.train(config, d, device=dev, progress=False, sample_grid=False)
            pipe = ddpmkit.load_checkpoint(d, device=dev)
    with tempfile.TemporaryDirectory() as d:
        export_diffusers(pipe, f"{d}/pipe")
        theirs = DDPMPipeline.from_pretrained(f"{d}/pipe").to(dev)
    theirs.set_progress_bar_config(disable=True)
    T = pipe.diffusion.num_timesteps

    def ours_ddpm():
        return pipe.sample(args.n, seed=0, batch_size=args.n)

    def diffusers_ddpm():
        with torch.inference_mode():
            return theirs(batch_size=args.n, generator=torch.Generator(device=dev).manual_seed(0),
                          num_inference_steps=T, output_type="pt").images

    def ours_ddim():
        return pipe.sample(args.n, seed=0, batch_size=args.n, sampler="ddim", sampler_options={"steps": 50})

    runs = {"ddpmkit ddpm": ours_ddpm, "diffusers ddpm": diffusers_ddpm, "ddpmkit ddim-50": ours_ddim}
    times = {k: [] for k in runs}
    peak = {}
    outputs = {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            outputs[name] = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {dev}, torch {torch.__version__}; {args.n} images, T = {T}")
    for k, v in med.items():
        mem = f", peak {peak[k]:.0f} MiB" if k in peak else ""
        print(f"  {k:<16} {v:8.2f} s{mem}")
    print(f"ratio ddpmkit/diffusers (DDPM, same T) = {med['ddpmkit ddpm'] / med['diffusers ddpm']:.3f}")
    print(f"ratio ddim-50/ddpm-{T} (ddpmkit) = {med['ddpmkit ddim-50'] / med['ddpmkit ddpm']:.3f}")
    if args.checkpoint:
        score = ddpmkit.build("metric", "digit-score", {}, device=dev)
        for name in ("ddpmkit ddpm", "ddpmkit ddim-50"):
            print(f"  digit-score {name}: {score(outputs[name].float())}")


if __name__ == "__main__":
    main()
