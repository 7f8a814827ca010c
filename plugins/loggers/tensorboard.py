"""Logger ``tensorboard``: TensorBoard event files in ``RUN/tb`` when the tensorboard package is
installed (left out without a word when it is not)."""

from __future__ import annotations

from pathlib import Path

import ddpmkit

SKIP = {"step", "epoch"}


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        for key, value in record.items():
            if key == "eval":
                for k, v in value.items():
                    self.writer.add_scalar(f"eval/{k}", v, step)
            elif key not in SKIP and "loss" in record and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_logger(*, run_dir):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return TensorBoardLogger(run_dir)


@ddpmkit.hookimpl
def register_loggers(register):
    register("tensorboard", tensorboard_logger, None, "TensorBoard events in RUN/tb (when tensorboard is installed)")
