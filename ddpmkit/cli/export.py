"""``ddpmkit export``: a run as a diffusers pipeline folder."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("run_dir", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["diffusers"]), default="diffusers", show_default=True)
@click.option("--device", default="cpu", show_default=True)
def export_cmd(run_dir, out, fmt, device):
    """Export a run (or checkpoint) to OUT: a diffusers DDPMPipeline folder (from_pretrained loads it)."""
    from ddpmkit.export import diffusers_call, export_diffusers
    from ddpmkit.run.pipeline import load_checkpoint

    pipe = load_checkpoint(run_dir, device=device)
    export_diffusers(pipe, out)
    click.echo(f"Wrote a diffusers DDPMPipeline to {out}")
    click.echo(f"Sample it as ddpmkit does (all T = {pipe.diffusion.num_timesteps} steps): "
               + diffusers_call(pipe).replace("OUT", repr(str(out))))
