"""DDPM sampling: ddpmkit vs diffusers' DDPMPipeline with the same UNet weights, betas and T.

Rows (all T steps unless named otherwise, ``-n`` images in one batch):
    diffusers ddpm        DDPMPipeline, fp32
    diffusers ddpm compile  DDPMPipeline, fp32, its UNet through torch.compile (as diffusers' docs
                          suggest); its time includes compiling. Only with --rows.
    ddpmkit ddpm          fp32, plain eager (same numbers as diffusers to ~1e-6)
    ddpmkit ddpm cl       fp32 with channels-last weights and inputs
    ddpmkit ddpm bf16     the fast path on a CPU with bf16 instructions: bf16 autocast
    ddpmkit ddpm compile  fp32 with torch.compile (``--compile``); its time includes compiling.
                          Only with --rows.
    ddpmkit ddim-50       DDIM, 50 steps, η = 0, fp32
On CUDA the fast-path rows use the CUDA defaults (see benchmarks/gpu_fast_path.py for the full
GPU table). Each row runs in its own child process, in alternating rounds, so that machine noise
hits every row alike and each row's peak memory is its own: on CUDA ``max_memory_allocated``, on
the CPU the rise of the process's peak resident memory (VmHWM) over its size before sampling.
With a digit checkpoint, the offline ``digit-score`` of each row's samples is printed too.

    python benchmarks/sampling_speed.py [CHECKPOINT] [-n 64] [--rounds 2] [--device auto]

Without a checkpoint, a randomly initialised tiny-preset UNet is timed (speed only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from rounds import alternate, with_peak  # benchmarks/rounds.py
from sides import diffusers_pipelines, diffusers_sample, laptop_checkpoint  # benchmarks/sides.py

import ddpmkit
from ddpmkit.run.accel import FastPath

ROWS = {
    "diffusers ddpm": None,
    "diffusers ddpm compile": None,
    "ddpmkit ddpm": FastPath(precision="fp32", channels_last=False, tf32=False, cuda_graphs=False),
    "ddpmkit ddpm cl": FastPath(precision="fp32", channels_last=True, tf32=False, cuda_graphs=False),
    "ddpmkit ddpm bf16": FastPath(precision="bf16"),
    "ddpmkit ddpm compile": FastPath(precision="fp32", channels_last=False, tf32=False, compile=True,
                                     cuda_graphs=False),
    "ddpmkit ddim-50": FastPath(precision="fp32", channels_last=False, tf32=False, cuda_graphs=False),
}


def child(args) -> None:
    """Run one row once; print its time, peak memory and (with a digit checkpoint) digit score as JSON."""
    dev = ddpmkit.resolve_device(args.device)
    pipe = ddpmkit.load_checkpoint(args.checkpoint, device=dev)
    T = pipe.diffusion.num_timesteps
    name = args.child
    if name.startswith("diffusers ddpm"):
        theirs, = diffusers_pipelines(pipe, dev)
        if name.endswith("compile"):
            theirs.unet = torch.compile(theirs.unet)

        def run():
            return diffusers_sample(theirs, args.n, dev, T)
    else:
        sampler, opts = ("ddim", {"steps": 50}) if "ddim" in name else (None, None)

        def run():
            return pipe.sample(args.n, seed=0, batch_size=args.n, sampler=sampler, sampler_options=opts,
                               fast=ROWS[name])
    def timed():
        t0 = time.perf_counter()
        images = run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return images, time.perf_counter() - t0

    if dev.type == "cuda":
        torch.cuda.synchronize()
    (images, seconds), peak = with_peak(timed, dev)
    out = {"seconds": seconds, "peak_mib": peak, "T": T, "device": str(dev), "threads": torch.get_num_threads()}
    if args.score:
        score = ddpmkit.build("metric", "digit-score", {}, device=dev)
        out["digit_score"] = score(images.float().cpu())
    print("RESULT " + json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--rows", default=",".join(r for r in ROWS if not r.endswith("compile")),
                   help="comma-separated rows (default: all but the two compile rows, which add minutes)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(map(repr, unknown))}; rows: {', '.join(ROWS)}")
    with tempfile.TemporaryDirectory() as d:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = laptop_checkpoint(f"{d}/run")

        scored: set[str] = set()  # a digit checkpoint's samples are scored in the first round only

        def row(name: str) -> dict:
            cmd = [sys.executable, __file__, checkpoint, "-n", str(args.n), "--device", args.device, "--child", name]
            if args.checkpoint and name not in scored:
                cmd.append("--score")
                scored.add(name)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"row {name} failed:\n{proc.stderr[-2000:]}")
            return json.loads(line[0][7:])

        results = alternate({r: (lambda r=r: row(r)) for r in rows}, args.rounds, measure=lambda fn: fn(),
                            show=lambda v: f"{v['seconds']:.1f} s")
    first = results[rows[0]][0]
    print(f"device {first['device']} ({first['threads']} threads), torch {torch.__version__}; "
          f"{args.n} images, T = {first['T']}, median of {args.rounds} rounds")
    med = {r: statistics.median(x["seconds"] for x in v) for r, v in results.items()}
    best = {r: min(x["seconds"] for x in v) for r, v in results.items()}
    for r, v in results.items():
        peak = max(x["peak_mib"] for x in v)
        score = v[0].get("digit_score")
        extra = (f", digit-score IS {score['digit_is']:.2f}, clear {score['digit_clear_fraction']:.0%}"
                 if score else "")
        print(f"  {r:<20} median {med[r]:7.2f} s, min {best[r]:7.2f} s, peak +{peak:.0f} MiB{extra}")
    # Noise on a shared machine only ever adds time, so the minimum is the steadier estimate.
    if "diffusers ddpm" in med:
        for r in rows:
            if r.startswith("ddpmkit ddpm") or r == "diffusers ddpm compile":
                print(f"ratio {r} / diffusers ddpm = {med[r] / med['diffusers ddpm']:.3f} (medians), "
                      f"{best[r] / best['diffusers ddpm']:.3f} (minima)")
    if "ddpmkit ddim-50" in med and "ddpmkit ddpm" in med:
        print(f"ratio ddpmkit ddim-50 / ddpmkit ddpm = {med['ddpmkit ddim-50'] / med['ddpmkit ddpm']:.3f}")


if __name__ == "__main__":
    main()
