"""Training state checkpoints: everything needed to continue a run bit for bit.

One file per checkpoint, ``checkpoints/step-00000100.safetensors``:

* tensors: ``model.*`` (raw weights), ``ema.N`` (EMA shadow parameters), ``optim.N.NAME`` (Adam's
  moments and step counts), ``rng.torch`` / ``rng.noise`` / ``rng.cuda.N`` (random generator states);
* metadata (JSON): the step, epoch and batch within the epoch (the data order is a function of
  the seed and the epoch, so this position restores it), the optimizer's hyper-parameters, the
  learning-rate schedule's counters, the EMA's counters, and the resolved run configuration.

Files are written to a temporary name, fsynced and renamed (``atomic_write``), so a kill during a
write never leaves a truncated file under a checkpoint's name; a newest checkpoint that still
cannot be read is skipped for the one before it, with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open

from ddpmkit.errors import DdpmkitError
from ddpmkit.sdk.files import write_tensors

STATE_FORMAT = "ddpmkit-train-state-1"
FORMAT = STATE_FORMAT
_NAME = re.compile(r"^step-(\d{8})\.safetensors$")


@attrs.define
class TrainState:
    """Where training is: optimizer steps done, the epoch, and full steps done within it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint files, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that can be opened (a damaged newest one is skipped with a warning)."""
    for path in reversed(checkpoints(ckpt_dir)):
        try:
            with safe_open(str(path), framework="pt") as fh:
                if (fh.metadata() or {}).get("format") == FORMAT:
                    return path
        except (SafetensorError, OSError, ValueError, RuntimeError):
            pass
        warnings.warn(f"checkpoint {path} is damaged; using the one before it", stacklevel=2)
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; remove leftovers of interrupted writes."""
    for tmp in ckpt_dir.glob(".step-*.tmp"):
        tmp.unlink(missing_ok=True)
    if keep > 0:
        for old in checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def cuda_rng_states(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The saved ``rng.cuda.N`` states in device order (``rng.cuda.10`` after ``rng.cuda.9``)."""
    keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    return [tensors[k] for k in keys]


def write_training_state(ckpt_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """``checkpoints/step-NNNNNNNN.safetensors`` from a trainer's ``state_dict()`` (values of ``meta``
    are stored as JSON strings), atomically."""
    strings = {k: json.dumps(_json_safe(v), sort_keys=True, allow_nan=False) for k, v in meta.items()}
    return write_tensors(ckpt_dir / f"step-{step:08d}.safetensors", tensors, {"format": FORMAT, **strings})


def read_training_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the metadata (JSON values decoded) of a training-state file."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise DdpmkitError(f"cannot read checkpoint '{path}': {exc}") from None
    try:
        return tensors, {k: json.loads(v) for k, v in meta.items() if k != "format"}
    except json.JSONDecodeError:
        raise DdpmkitError(f"checkpoint '{path}' has corrupt metadata") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Adam's moments and step counts as ``optim.N.NAME`` tensors, and its param groups."""
    sd = optimizer.state_dict()
    tensors = {f"optim.{idx}.{name}": torch.as_tensor(value)
               for idx, st in sd["state"].items() for name, value in st.items()}
    return tensors, _json_safe(sd["param_groups"])


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(noise_gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The global CPU generator, the training-noise generator and every CUDA generator."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.noise": noise_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def load_rng_tensors(tensors: dict[str, torch.Tensor], noise_gen: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    noise_gen.set_state(tensors["rng.noise"])
    cuda_states = cuda_rng_states(tensors)
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
