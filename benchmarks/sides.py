"""The two sides the benchmarks put next to each other: a small ddpmkit checkpoint, and the same
weights, betas and T in diffusers' ``DDPMPipeline``."""

from __future__ import annotations

import tempfile

import torch

import ddpmkit
from ddpmkit.export import export_diffusers


def laptop_checkpoint(run_dir: str, timesteps: int | None = None) -> str:
    """A tiny-preset (16×16) run trained for one step, written to ``run_dir`` (its weights are all but
    the initial ones, and cost the same to run as trained ones)."""
    config = ddpmkit.preset_config("tiny")
    config.max_steps, config.ema_decay = 1, None
    if timesteps:
        config.schedule.options["timesteps"] = timesteps
    ddpmkit.train(config, run_dir, device="cpu", progress=False, sample_grid=False)
    return run_dir


def diffusers_pipelines(pipe: ddpmkit.Pipeline, dev: torch.device, copies: int = 1) -> list:
    """``copies`` separate ``DDPMPipeline``s holding ``pipe``'s weights and schedule, on ``dev``,
    without progress bars."""
    from diffusers import DDPMPipeline

    with tempfile.TemporaryDirectory() as d:
        export_diffusers(pipe, f"{d}/pipe")
        pipes = [DDPMPipeline.from_pretrained(f"{d}/pipe").to(dev) for _ in range(copies)]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


def diffusers_sample(theirs, n: int, dev: torch.device, steps: int) -> torch.Tensor:
    """``n`` images from ``theirs`` in ``steps`` steps from seed 0, in [-1, 1] as ddpmkit returns them."""
    with torch.inference_mode():
        images = theirs(batch_size=n, generator=torch.Generator(device=dev).manual_seed(0),
                        num_inference_steps=steps, output_type="pt").images
    return images * 2 - 1
