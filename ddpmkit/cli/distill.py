"""``ddpmkit distill``: a finished run (the teacher) into a student that samples in a few calls."""

from __future__ import annotations

import click

from ddpmkit.cli._common import _parse_sets, err_console
from ddpmkit.errors import DdpmkitError


@click.command("distill")
@click.argument("teacher", required=False, type=click.Path())
@click.option("--method", default=None, help="Distiller by name: progressive (vp, edm, flow) or reflow (flow); "
                                             "`ddpmkit plugins` lists them. Default progressive.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="The student's run directory.")
@click.option("--calls", type=int, default=None, help="Network calls the student samples in (the method's option "
                                                      "calls; progressive: a halving of distiller.start).")
@click.option("--steps", type=int, default=None, help="Training steps (progressive: per stage).")
@click.option("--set", "sets", multiple=True, metavar="distiller.OPTION=VALUE",
              help="A method option, e.g. distiller.pairs=2048 (`ddpmkit plugins --options`).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Adam's learning rate.")
@click.option("--lr-decay", type=float, default=0.0, show_default=True,
              help="The share (0–1) of each stage over which the learning rate falls linearly to 0.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="The classifier-free guidance weight W the student is distilled at (class-conditional teachers).")
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--num-samples", type=int, default=64, show_default=True, help="Images in each stage's grid.")
@click.option("--resume", "resume", type=click.Path(file_okay=False), default=None,
              help="Continue the distillation in this student directory.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier distillation in --out.")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def distill_cmd(teacher, method, out, calls, steps, sets, batch_size, lr, lr_decay, seed, guidance, checkpoint_every,
                num_samples, resume, overwrite, device, no_progress):
    """Distill TEACHER (a finished run directory or its model.safetensors) into a student run in --out
    that `ddpmkit sample` draws in the student's number of calls."""
    from ddpmkit.run.distill import SETTINGS, Distillation, resume_settings

    if resume:
        if teacher or method or out or calls or steps or sets:
            raise DdpmkitError("--resume STUDENT continues with the student's own config.json; give no TEACHER, "
                               "--method, --out, --calls, --steps or --set")
        saved = resume_settings(resume)
        job = Distillation(saved["teacher"], resume, saved["method"], saved.get("options"),
                           **{k: saved[k] for k in SETTINGS if k in saved}, device=device, console=err_console,
                           progress=not no_progress)
        path = job.run(resume=True)
    else:
        if not teacher:
            raise DdpmkitError("give the TEACHER run to distill (ddpmkit distill RUN --method progressive --out "
                               "STUDENT), or --resume STUDENT")
        if not out:
            raise DdpmkitError("give the student's directory: --out STUDENT")
        options = dict(_parse_sets(sets, ("distiller",), "distill").get("distiller", {}))
        if calls is not None:
            options["calls"] = calls
        if steps is not None:
            options["steps"] = steps
        job = Distillation(teacher, out, method or "progressive", options, batch_size=batch_size, lr=lr,
                           lr_decay=lr_decay, seed=seed, guidance=guidance, checkpoint_every=checkpoint_every,
                           num_samples=num_samples, device=device, console=err_console, progress=not no_progress)
        path = job.run(overwrite=overwrite)
    if path.name == "checkpoints":
        click.echo(f"Stopped with a checkpoint in {path}")
        return
    calls_done = job.stages[-1].calls
    click.echo(f"Student: {path} ({calls_done} call{'s' if calls_done > 1 else ''}; "
               f"ddpmkit sample {path.parent}); report {path.parent / 'distill.json'}")
