"""Checkpoints: weights in safetensors, the resolved configuration as JSON. Never pickle.

A checkpoint is one ``.safetensors`` file whose metadata holds the resolved run
configuration (``ddpmkit.config``), so it is self-contained; the run directory
also keeps that configuration as ``config.json`` for people to read. Every file
is written to a temporary name, flushed to disk, then renamed, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import DdpmkitError

FORMAT = "ddpmkit-checkpoint-1"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")

    return atomic_write(path, write)


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Tensors (moved to the CPU, made contiguous) and string metadata to one safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``state_dict`` and ``config`` (JSON-ready) to one safetensors file, atomically."""
    return write_tensors(path, state_dict, {"format": FORMAT, "config": json.dumps(config, sort_keys=True)})


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Accept a checkpoint file or a run directory (→ its ``model.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise DdpmkitError(f"no checkpoint at '{path}': give a .safetensors file written by ddpmkit or a run directory")
    return p


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights and configuration; unreadable, truncated or foreign files → DdpmkitError."""
    p = resolve_checkpoint_path(path)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DdpmkitError(f"cannot read checkpoint '{p}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
                           "(truncated or not a safetensors file?)") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise DdpmkitError(f"'{p}' is a safetensors file but not a ddpmkit checkpoint (no ddpmkit config in its metadata)")
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError:
        raise DdpmkitError(f"checkpoint '{p}' has a corrupt configuration") from None
    return tensors, config
