"""``ddpmkit report``: one HTML page of one or several runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="The HTML file (default RUN_DIR/report.html for one run, report.html for several).")
def report(run_dirs, out):
    """Write one self-contained HTML page (images embedded, opens from disk) showing RUN_DIRS: configuration,
    loss and metric curves, the grid of every epoch, the forward process, the analysis; several runs side by side.
    A sweep's study directory (runs/STUDY) shows its trials, its plots and its best trials."""
    from ddpmkit.report import write_report

    if out is None:
        out = Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html")
    path = write_report(list(run_dirs), out)
    click.echo(f"Wrote {path}")
