"""What a DDPM sampling loop costs around the network: ddpmkit vs diffusers' DDPMPipeline.

Both libraries' networks are replaced by a stub that returns the same precomputed tensor, so what is
timed is everything else in a sampling step: drawing the noise, the reverse-step arithmetic
(Algorithm 2 lines 3–5), the timestep tensors, the module call, and any host synchronisation. The
two loops run the same T steps on the same batch shape, in alternating rounds, in one process.

    python benchmarks/sampling_overhead.py [-n 64] [--timesteps 1000] [--rounds 5] [--device auto] [--network]

With ``--network`` the laptop UNet is kept (not stubbed): whole sampling steps, both libraries in
one process, which is steadier than the child processes of sampling_speed.py.

On a GPU this is where per-step allocations and host waits show; on a CPU the network is usually
over 95% of a step (see sampling_speed.py for whole-sampling times).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from rounds import alternate  # benchmarks/rounds.py
from sides import diffusers_pipelines, diffusers_sample, laptop_checkpoint  # benchmarks/sides.py

import ddpmkit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=64, help="images in the batch")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--network", action="store_true", help="keep the (randomly initialised) laptop UNet")
    args = p.parse_args()
    from diffusers.models.unets.unet_2d import UNet2DOutput

    dev = ddpmkit.resolve_device(args.device)
    with tempfile.TemporaryDirectory() as d:
        pipe = ddpmkit.load_checkpoint(laptop_checkpoint(f"{d}/run", args.timesteps), device=dev)
    theirs, = diffusers_pipelines(pipe, dev)
    T = pipe.diffusion.num_timesteps
    shape = (args.n, pipe.channels, pipe.resolution, pipe.resolution)
    const = torch.randn(shape, device=dev, generator=torch.Generator(device=dev).manual_seed(1)) * 0.1
    if not args.network:  # The stubs: each library still calls its module (nn.Module.__call__), which returns at once.
        pipe.model.forward = lambda x, t: const
        theirs.unet.forward = lambda x, t, *a, **k: UNet2DOutput(sample=const)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ddpmkit_loop():
        out = pipe.sample(args.n, seed=0, batch_size=args.n, fast=ddpmkit.FastPath.eager())
        sync()
        return out

    def diffusers_loop():
        out = diffusers_sample(theirs, args.n, dev, T)
        sync()
        return out

    # Same noise, same arithmetic: the two loops must give the same images.
    a, b = ddpmkit_loop(), diffusers_loop().cpu()
    diff = (a - b).abs().max().item()
    results = alternate({"diffusers": diffusers_loop, "ddpmkit": ddpmkit_loop}, args.rounds,
                        show=lambda v: f"{v * 1e6 / T:.0f} µs/step")
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"device {dev} ({torch.get_num_threads()} threads), torch {torch.__version__}; batch {args.n}, "
          f"T = {T}, network {'kept' if args.network else 'stubbed'}, median of {args.rounds} rounds; "
          f"max |Δ| between the loops' images {diff:.1e}")
    for k, v in med.items():
        print(f"  {k:<10} {v * 1e6 / T:8.1f} µs per step ({v:.2f} s for T steps)")
    print(f"ratio ddpmkit / diffusers = {med['ddpmkit'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
