"""``ddpmkit sample``: draw images from a checkpoint (a grid, PNG files or an .npz)."""

from __future__ import annotations

from pathlib import Path

import click

from ddpmkit.cli._common import (
    _class_list,
    _fast_path,
    _parse_sets,
    err_console,
    fast_options,
)
from ddpmkit.errors import DdpmkitError


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-n", "--num", "n", type=int, default=64, show_default=True, help="Number of images.")
@click.option("--format", "fmt", type=click.Choice(["grid", "png", "npz"]), default="grid", show_default=True,
              help="grid: one PNG grid; png: one PNG per image in a folder (class in the name for conditional "
                   "models); npz: guided-diffusion's .npz (arr_0 uint8 N×H×W×C, arr_1 the class labels).")
@click.option("--out", "out", type=click.Path(), default=None,
              help="Where to write: the grid (default samples.png), the folder (default samples/) or the .npz "
                   "(default samples.npz).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--sampler", default=None, help="Sampler by name (default: the run's, ddpm).")
@click.option("--steps", type=int, default=None, help="Sampler steps (ddim and the solvers: up to T).")
@click.option("--set", "sets", multiple=True, metavar="sampler.OPTION=VALUE", help="Sampler option, e.g. sampler.eta=0.5.")
@click.option("--class", "classes", multiple=True, metavar="CLASS[,CLASS...]",
              help="Classes to draw (index or name; repeatable; class-conditional models; default: every class, "
                   "in equal blocks).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance weight W (0: unconditional, 1: conditional (default), > 1: guided).")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
@fast_options
def sample(checkpoint, n, fmt, out, seed, batch_size, sampler, steps, sets, classes, guidance, device, no_progress,
           fast):
    """Draw images from a CHECKPOINT (a run directory, its model.safetensors or a checkpoints/step-*
    training-state file) with Algorithm 2."""
    from ddpmkit.run.pipeline import load_checkpoint, save_grid, save_image_files, save_npz
    from ddpmkit.run.progress import sample_with_progress

    if n < 1:
        raise DdpmkitError(f"-n must be >= 1, got {n}")
    if batch_size < 1:
        raise DdpmkitError(f"--batch-size must be >= 1, got {batch_size}")
    options = _parse_sets(sets, ("sampler",), "sample").get("sampler", {})
    if steps is not None:
        options["steps"] = steps
    pipe = load_checkpoint(checkpoint, device=device)
    if options and "steps" in options and sampler in (None, "ddpm") and pipe.config.sampler.name == "ddpm":
        if int(options["steps"]) != pipe.diffusion.num_timesteps:
            raise DdpmkitError(f"the ddpm sampler always takes T = {pipe.diffusion.num_timesteps} steps; "
                               f"use --sampler dpm-solver++ (or ddim) --steps {options['steps']}")
        options.pop("steps")
    out = out or {"grid": "samples.png", "png": "samples", "npz": "samples.npz"}[fmt]
    is_file, is_dir = Path(out).is_file(), Path(out).is_dir()
    if is_file if fmt == "png" else is_dir:
        raise DdpmkitError(f"--out '{out}' is a {'file' if is_file else 'folder'}; --format {fmt} writes "
                           + ("a folder of PNGs" if fmt == "png" else "a file"))
    labels = pipe.class_labels(n, _class_list(classes))
    pipe.sampler(sampler, options or None)  # a sampler that cannot run here fails before any sampling
    images = sample_with_progress(pipe, n, err_console, not no_progress, seed=seed, batch_size=batch_size,
                                  sampler=sampler, sampler_options=options or None, fast=_fast_path(pipe, fast),
                                  class_labels=labels, guidance=guidance)
    labels = pipe.data_classes(labels)  # a cluster is not a class of the data: files are not named by it
    if fmt == "png":
        save_image_files(images, out, labels, pipe.classes)
    elif fmt == "npz":
        save_npz(images, out, labels)
    else:
        save_grid(images, out)
    click.echo(f"Wrote {n} samples to {out}" + (" (one PNG each)" if fmt == "png" else ""))
