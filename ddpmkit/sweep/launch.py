"""Launching one trial: a child process (or torchrun for several GPUs) that runs `ddpmkit run` on the
trial's configuration, watched and stopped cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ddpmkit.errors import DdpmkitError, Interrupted


def _run_args(spec: dict) -> list[str]:
    """The ``ddpmkit run`` arguments that run a trial ``spec`` (resume its directory, or start it from its
    configuration file)."""
    start = ["--resume", spec["run_dir"]] if spec["resume"] else \
        ["--config", spec["config"], "--out", spec["run_dir"], "--overwrite"]
    return ["run", *start, "--no-progress", "--device", spec["device"]]


def _start(spec: dict, nproc: int, log, start_method: str = "forkserver"):
    """Start the trial ``spec`` in a process of its own, its output going to ``log``. Several processes:
    ``ddpmkit run`` under ``torchrun``. One: the training API in a process forked either from this worker
    (``start_method="fork"``, what the CLI does: the worker has imported torch but run nothing with it) or
    from multiprocessing's fork server (the default for a worker embedded in a program that may have run
    torch: a process that has used torch's OpenMP threads cannot fork safely). Either fork has torch and
    diffusers imported already: a trial starts in well under a second. Each trial stops (checkpoint, exit)
    when its worker is gone, even killed by SIGKILL."""
    if nproc > 1 or not sys.platform.startswith("linux"):
        args = _run_args(spec)
        cmd = [sys.executable, "-m", "ddpmkit", *args]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "ddpmkit", *args]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return _Forked(spec, Path(log.name), start_method)


#: What every trial imports: loaded once, before the trials are forked.
PRELOAD = ["ddpmkit.run.trainer", "ddpmkit.sdk.evaluation", "diffusers.models.unets.unet_2d"]


def _trial_context(start_method: str):
    import importlib
    import multiprocessing

    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    else:
        for name in PRELOAD:
            importlib.import_module(name)
    return ctx


class _Forked:
    """A forked trial process, with the part of :class:`subprocess.Popen` the worker uses."""

    def __init__(self, spec: dict, log_path: Path, start_method: str):
        self.proc = _trial_context(start_method).Process(target=_trial_main, args=(spec, str(log_path), os.getpid()),
                                                         daemon=False)
        self.proc.start()
        self.pid = self.proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self.proc.is_alive():
            self.proc.join()
            self.returncode = self.proc.exitcode
        return self.returncode

    def wait(self) -> int:
        self.proc.join()
        return self.poll()


def _trial_main(spec: dict, log_path: str, worker_pid: int) -> None:
    """The forked trial: output to the log, a new session, default signal handlers, a watch on the worker (gone:
    SIGTERM to itself, so the run checkpoints and exits), then the run, as ``ddpmkit run`` would do it: a
    :class:`DdpmkitError` is one line and exit 2, a stop on a signal exits 128 + signal."""
    import threading

    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.setsid()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)
    threading.Thread(target=_watch_worker, args=(worker_pid,), daemon=True).start()
    from rich.console import Console

    from ddpmkit.run.config import load_config_file
    from ddpmkit.run.trainer import resumed_config, train

    console, run_dir, t0 = Console(stderr=True), spec["run_dir"], time.perf_counter()
    try:
        if spec["resume"]:
            train(resumed_config(run_dir), run_dir, device=spec["device"], progress=False, console=console, resume=True)
            print(f"Resumed and finished in {time.perf_counter() - t0:.0f} s. Run directory: {run_dir}", flush=True)
        else:
            train(load_config_file(spec["config"]), run_dir, device=spec["device"], progress=False, console=console,
                  overwrite=True)
            print(f"Trained in {time.perf_counter() - t0:.0f} s. Run directory: {run_dir}", flush=True)
    except DdpmkitError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


def _watch_worker(pid: int) -> None:
    from ddpmkit.run.rundir import pid_alive

    while pid_alive(pid):
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _die_with_parent() -> None:
    """In the trial process: get SIGTERM (checkpoint and exit) if the worker dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_run(child: subprocess.Popen, run_dir: Path) -> None:
    """SIGTERM the run (rank 0 under torchrun, whose pid the run directory's lock holds): it checkpoints, exits."""
    pid = child.pid
    lock = run_dir / ".ddpmkit.lock"
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(json.loads(lock.read_text())["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
