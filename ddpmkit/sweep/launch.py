"""Launching one trial: a child process (or torchrun for several GPUs) that runs `ddpmkit run` on the
trial's configuration, watched and stopped cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs

from ddpmkit.errors import DdpmkitError, Interrupted
from ddpmkit.sweep.study import _pruner, _quiet, import_optuna, open_storage

PRUNED_EXIT = 3  # the exit code of a trial process whose run the pruner stopped


@attrs.frozen
class TrialSpec:
    """What one trial's process runs.

    Attributes:
        run_dir: the trial's run directory.
        device: ``--device`` of every trial.
        config: the trial's RunConfig as a JSON file; ``None``: continue ``run_dir`` from its checkpoint.
        storage: the study's storage URL (the run reports its evaluations there).
        study: the study's name.
        number: the trial's number in the study.
        key: the result of the objective metric that is reported and pruned on.
        pruner: ``median``, ``halving`` or ``none``; prune_after: trials the median pruner waits for.
    """

    run_dir: str
    device: str
    config: str | None
    storage: str
    study: str
    number: int
    key: str
    pruner: str = "median"
    prune_after: int = 3

    @property
    def resume(self) -> bool:
        return self.config is None


class TrialPruned(Exception):
    """The pruner stopped the trial at ``step`` (its intermediate value ``value``)."""

    def __init__(self, step: int, value: float):
        super().__init__(f"pruned at step {step} ({value:.6g})")
        self.step, self.value = step, value


class TrialReporter:
    """The trial run's ``on_log`` callback: each evaluation of the objective during training (not the
    final one, which is the trial's value) is reported to the Optuna trial, and when the pruner says
    so the run stops with :class:`TrialPruned`; the step is kept in the trial's ``pruned_at_step``."""

    def __init__(self, spec: TrialSpec):
        self.spec, self._trial = spec, None

    def trial(self):
        if self._trial is None:
            optuna = import_optuna()
            storage = open_storage(self.spec.storage, heartbeat=None)
            with _quiet(optuna):
                study = optuna.load_study(study_name=self.spec.study, storage=storage,
                                          pruner=_pruner(self.spec.pruner, self.spec.prune_after))
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, self.spec.number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def __call__(self, record: dict) -> None:
        value = (record.get("eval") or {}).get(self.spec.key)
        if value is None or record.get("final") or not math.isfinite(value):
            return
        trial, step = self.trial(), int(record["step"])
        trial.report(float(value), step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", step)
            raise TrialPruned(step, float(value))


def run_trial(spec: TrialSpec) -> int:
    """Run the trial as ``ddpmkit run`` would (:func:`~ddpmkit.run.trainer.run_job`), reporting to its
    study; returns the exit code: 0 done, 2 bad input (one line), :data:`PRUNED_EXIT`, or the code of a
    stop on a signal."""
    from rich.console import Console

    from ddpmkit.run.config import load_config_file
    from ddpmkit.run.trainer import resumed_config, run_job

    try:
        config = resumed_config(spec.run_dir) if spec.resume else load_config_file(spec.config)
        print(run_job(config, spec.run_dir, resume=spec.resume, device=spec.device, progress=False,
                      console=Console(stderr=True), overwrite=not spec.resume, on_log=TrialReporter(spec)), flush=True)
        return 0
    except DdpmkitError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrialPruned as exc:
        print(f"Trial {spec.number}: {exc}", file=sys.stderr, flush=True)
        return PRUNED_EXIT
    except Interrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return exc.exit_code


def _spec_file(spec: TrialSpec, log_path: Path) -> Path:
    """The spec as JSON beside the trial's log (readable by its owner only: it holds the storage URL)."""
    path = log_path.with_suffix(".spec.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(attrs.asdict(spec), fh)
    return path


def _start(spec: TrialSpec, nproc: int, log, start_method: str = "forkserver"):
    """Start the trial ``spec`` in a process of its own, its output going to ``log``. Several processes: this
    module (:func:`main`, which runs :func:`run_trial`) under ``torchrun``. One: the training API in a
    process forked either from this worker (``start_method="fork"``, what the CLI does: the worker has
    imported torch but run nothing with it) or from multiprocessing's fork server (the default for a worker
    embedded in a program that may have run torch: a process that has used torch's OpenMP threads cannot
    fork safely). Either fork has torch and diffusers imported already: a trial starts in well under a
    second. Each trial stops (checkpoint, exit) when its worker is gone, even killed by SIGKILL."""
    if nproc > 1 or not sys.platform.startswith("linux"):
        args = ["-m", "ddpmkit.sweep", str(_spec_file(spec, Path(log.name)))]
        cmd = [sys.executable, *args]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
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

    def __init__(self, spec: TrialSpec, log_path: Path, start_method: str):
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


def _trial_main(spec: TrialSpec, log_path: str, worker_pid: int) -> None:
    """The forked trial: output to the log, a new session, default signal handlers, a watch on the worker (gone:
    SIGTERM to itself, so the run checkpoints and exits), then :func:`run_trial`."""
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
    sys.exit(run_trial(spec))


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


def main(argv: list[str] | None = None) -> None:
    """``python -m ddpmkit.sweep SPEC.json``: one trial process (each rank under torchrun)."""
    path = (argv if argv is not None else sys.argv[1:])[0]
    sys.exit(run_trial(TrialSpec(**json.loads(Path(path).read_text()))))
