"""Rich progress bars for training, sampling and metrics."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def make_progress(console: Console | None = None, enabled: bool = True) -> Progress:
    """A bar with description, count, a free ``info`` field, elapsed time and ETA (description and info
    are printed as written: no rich markup is read in them)."""
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )


def sample_with_progress(pipe, n: int, console: Console | None = None, enabled: bool = True, **kwargs) -> torch.Tensor:
    """``pipe.sample(n, **kwargs)`` under a rich progress bar (reverse steps done / total)."""
    with make_progress(console, enabled) as bar:
        task = bar.add_task("sampling", total=None, info=f"{n} images")
        return pipe.sample(n, progress=lambda k, total: bar.update(task, completed=k, total=total), **kwargs)


def cell(value) -> str:
    """A value as a table cell shows it: floats to 4 significant digits, anything else as ``str``."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
