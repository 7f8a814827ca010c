"""Model files: weights in safetensors, the resolved configuration as JSON. Never pickle.

Two kinds of file, both self-contained (the resolved run configuration is in the metadata):

* the **model file**, ``RUN/model.safetensors`` (format ``ddpmkit-checkpoint-1``): the weights
  sampling uses (EMA weights when EMA is on);
* the **training-state file**, ``RUN/checkpoints/step-NNNNNNNN.safetensors`` (format
  ``ddpmkit-train-state-1``, see :mod:`ddpmkit.run.train_state`): model, EMA, optimizer, RNG states and the
  position in the data, to resume a run.

Every command that reads weights accepts either (a training-state file samples with its EMA
weights when it has them). Every file is written to a temporary name, flushed to disk, then
renamed, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open

from ddpmkit.errors import DdpmkitError
from ddpmkit.run.train_state import STATE_FORMAT, latest_checkpoint
from ddpmkit.sdk.files import write_tensors

MODEL_FORMAT = "ddpmkit-checkpoint-1"


def save_model_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write a model file: ``state_dict`` and ``config`` (JSON-ready) in one safetensors file, atomically."""
    return write_tensors(path, state_dict, {"format": MODEL_FORMAT, "config": json.dumps(config, sort_keys=True,
                                                                                           allow_nan=False)})


def find_weights_file(path: str | os.PathLike) -> Path:
    """A model or training-state file as given; for a run directory its ``model.safetensors``, or,
    while the run is still training, its newest complete training-state file."""
    p = Path(path)
    if p.is_dir():

        model = p / "model.safetensors"
        p = model if model.exists() else (latest_checkpoint(p / "checkpoints") or model)
    if not p.exists():
        raise DdpmkitError(f"no checkpoint at '{path}': give a run directory, its model.safetensors or one of its "
                           "checkpoints/step-*.safetensors")
    return p


@attrs.frozen
class WeightsFile:
    """What :func:`read_weights_file` found: the tensors, the resolved configuration and the kind."""

    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    kind: str  # "model" or "training-state"


def read_weights_file(path: str | os.PathLike) -> WeightsFile:
    """Read a model file or a training-state file; unreadable, truncated or foreign files → DdpmkitError."""
    p = find_weights_file(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DdpmkitError(f"cannot read checkpoint '{p}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
                           "(truncated or not a safetensors file?)") from None
    kind = {MODEL_FORMAT: "model", STATE_FORMAT: "training-state"}.get(metadata.get("format"))
    if kind is None or "config" not in metadata:
        raise DdpmkitError(f"'{p}' is a safetensors file but not a ddpmkit checkpoint (its metadata has no ddpmkit "
                           "format and configuration)")
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError:
        raise DdpmkitError(f"checkpoint '{p}' has a corrupt configuration") from None
    return WeightsFile(p, tensors, config, kind)
