"""The run directory is the user's data: who may write it, and what an overwrite removes.

* A new run refuses a directory that is not empty, unless told to ``overwrite`` it (which removes
  the files of the earlier run listed in :data:`RUN_FILES`, and nothing else) or to resume it.
* A run holds a lock file, :data:`LOCK_NAME`, for its whole life (``fcntl.flock``: the kernel
  releases it when the process dies, however it dies). A second process on the same directory is
  refused in one line; a lock file left by a process that is gone is taken over with a warning.
  Readers (``ddpmkit sample``/``evaluate``) take no lock: every file is replaced atomically, so
  they always read a complete one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

from ddpmkit.errors import DdpmkitError

LOCK_NAME = ".ddpmkit.lock"
# What a run writes; --overwrite removes these and leaves anything else in the directory alone.
RUN_FILES = ("config.json", "model.safetensors", "checkpoints", "metrics.jsonl", "samples.png", "samples",
             "forward.png", "loss.png", "tb", "eval.json", "posthoc-ema")


def contents(run_dir: Path) -> list[str]:
    """The entries of ``run_dir`` other than the lock file (none if it does not exist)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run may use ``run_dir`` if it is missing or empty, or with ``overwrite``."""
    found = contents(run_dir)
    if found and not overwrite:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise DdpmkitError(f"run directory '{run_dir}' is not empty ({shown}); continue that run with --resume "
                           f"{run_dir}, replace it with --overwrite (removes the earlier run's files), or choose "
                           "another --out")


def clear_run_files(run_dir: Path, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Remove an earlier run's files (``names``, default :data:`RUN_FILES`) from ``run_dir``; returns what
    was removed."""
    removed = []
    for name in names:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on Linux a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class RunLock:
    """The lock a run holds on its directory (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.fd = Path(run_dir), Path(run_dir) / LOCK_NAME, None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict, extra: str = "") -> None:
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = f" since {holder['started']}" if holder.get("started") else ""
        raise DdpmkitError(f"run directory '{self.run_dir}' is in use by {who}{since}; wait for that run to end "
                           f"or choose another --out{extra}")

    def acquire(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise DdpmkitError(f"'{self.run_dir}' is a file, not a run directory; choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._refuse(self._holder())
        holder, host = self._holder(), socket.gethostname()
        if holder.get("pid") and holder.get("pid") != os.getpid():
            if holder.get("host") not in (host, None):  # flock may not reach across machines
                os.close(fd)
                self._refuse(holder, f" (if it is gone, delete {self.path})")
            if pid_alive(int(holder["pid"])):  # a file system where flock does not hold
                os.close(fd)
                self._refuse(holder)
            warnings.warn(f"run directory '{self.run_dir}' was locked by process {holder['pid']} on {host}, which "
                          "is no longer running; taking the lock over", stacklevel=2)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": host,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
