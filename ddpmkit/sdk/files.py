"""Writing files so that a crash never leaves half of one: a temporary name, fsync, rename.

Plugins use these too (a logger's JSON lines, a dataset's cache): ``atomic_write`` for any writer,
``write_json`` and ``write_tensors`` (safetensors) on top of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the mode an ordinary file gets
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
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, allow_nan=False)
            fh.write("\n")

    return atomic_write(path, write)


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors file's header in place with its metadata keys sorted. safetensors writes the
    metadata from a hash map whose order changes from process to process, so the same tensors and
    metadata gave files that differed in their header; sorted, the same inputs give the same bytes.
    The header keeps its length (the same JSON, reordered; padded with spaces, as the format allows)."""
    with open(path, "rb+") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # (always, for the JSON safetensors writes; otherwise the file stays as written)
            fh.seek(8)
            fh.write(text.ljust(n, b" "))


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Tensors (moved to the CPU, made contiguous) and string metadata to one safetensors file, atomically;
    the same tensors and metadata always give the same bytes (metadata keys sorted)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        _sort_metadata(tmp)

    return atomic_write(path, write)
