"""Logger ``jsonl``: ``metrics.jsonl`` (one JSON object per record) and ``loss.png`` in the run directory.

On resume, records after the checkpoint's step are dropped (they belong to the interrupted part),
and so is a torn last line that a kill left behind, with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import ddpmkit
from ddpmkit.sdk.files import atomic_write


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn (unparseable) line is dropped with a warning."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: line {n} is torn (an interrupted write); dropped", stacklevel=2)
    return records


class JsonlLogger:
    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path, self.plot = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "loss.png"
        if resume_step is not None and self.path.exists():  # forget what the killed run logged after the checkpoint
            keep = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in keep)))
        self.file = open(self.path, "a")  # noqa: SIM115 (closed in close())

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        if "loss" not in record:
            self.file.flush()

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file.closed:
            return
        self.file.close()
        loss_curve(read_records(self.path), self.plot)


def loss_curve(rows: list[dict], out: Path) -> None:
    """loss.png: the logged losses and the epoch means (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows if "loss" in r]
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], lw=0.8, label="loss (logged steps)")
    ep = [r for r in rows if "mean_loss" in r]
    if ep:
        ax.plot([r["step"] for r in ep], [r["mean_loss"] for r in ep], "o-", ms=3, label="epoch mean")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


@ddpmkit.hookimpl
def register_loggers(register):
    register("jsonl", lambda *, run_dir, resume_step: JsonlLogger(run_dir, resume_step), None,
             "metrics.jsonl and loss.png in the run directory")
