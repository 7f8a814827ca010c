"""The sweep worker: asks the study for trials, launches each, prunes, records its value; several workers can share one study."""

from __future__ import annotations

import contextlib
import enum
import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import attrs

from ddpmkit.errors import DdpmkitError, Interrupted
from ddpmkit.run.signals import on_stop_signals
from ddpmkit.sweep.launch import PRUNED_EXIT, TrialSpec, _Forked, _start, _stop_run
from ddpmkit.sweep.results import _fmt, _last_error, _read_json, _short, _write_json
from ddpmkit.sweep.space import Space, trial_config
from ddpmkit.sweep.study import (
    RETRY_OF,
    _pruner,
    _quiet,
    ask_lock,
    default_storage,
    import_optuna,
    masked,
    open_storage,
    requeue,
)


# --------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------
@attrs.define
class SweepOptions:
    """What ``ddpmkit sweep`` was asked for (see its --help)."""

    space: Space | None
    metric: str
    objective: str
    direction: str
    trials: int = 20
    study: str = "sweep"
    storage: str | None = None
    runs_dir: Path = Path("runs")
    pruner: str = "median"
    prune_after: int = 3  # completed trials before the median pruner acts
    seed: int | None = None
    eval_every: int | None = None
    eval_samples: int | None = None
    overrides: dict = attrs.field(factory=dict)  # --set KIND.OPTION=VALUE for every trial
    loggers: tuple[str, ...] = ()
    device: str = "auto"
    nproc_per_trial: int = 1
    heartbeat: int = 30
    start_method: str = "forkserver"  # how one-process trials start (see _start); the CLI's worker forks


def _study_dir(opts: SweepOptions) -> Path:
    return opts.runs_dir / opts.study


def _trial_dir(opts: SweepOptions, number: int) -> Path:
    return _study_dir(opts) / f"trial-{number:04d}"


def trial_user_options(opts: SweepOptions, number: int) -> tuple[dict, dict]:
    """RunConfig changes and component overrides every trial gets from the sweep's own flags. With
    ``--logger mlflow`` the trial's MLflow run nests, through the plugin's own options, under one run
    of the study (tagged ``ddpmkit.study``), which also gets the trial's value as ``trial/KEY`` at
    step = the trial's number."""
    changes: dict[str, Any] = {"metrics": (opts.metric,)}
    if opts.eval_every is not None:
        changes["eval_every"] = opts.eval_every
    if opts.eval_samples is not None:
        changes["eval_samples"] = opts.eval_samples
    overrides = {k: dict(v) for k, v in opts.overrides.items()}
    if opts.loggers:
        changes["loggers"] = tuple(opts.loggers)
    if "mlflow" in opts.loggers:
        overrides.setdefault("logger", {}).update({
            "run_name": f"trial-{number:04d}", "parent_tag": f"ddpmkit.study={opts.study}",
            "parent_metric": opts.objective, "parent_step": str(number)})
    return changes, overrides


class TrialState(enum.Enum):
    """How a trial ended (``trial.json``'s ``state``)."""

    COMPLETE = "complete"  # its final evaluation gave the objective: told to the study
    PRUNED = "pruned"  # the pruner stopped it
    STOPPED = "stopped"  # this worker was asked to stop: queued again, resumes from its checkpoint
    FAILED = "failed"  # its run failed, or gave a non-finite value
    MISSING = "missing"  # the metric gave no such result: the sweep stops (the study is misconfigured)


@attrs.frozen
class TrialOutcome:
    """A trial's end: its state, value (complete trials), the step it was pruned at, and a note."""

    state: TrialState
    value: float | None = None
    pruned_at: int | None = None
    note: str | None = None


class Worker:
    """One ``ddpmkit sweep`` process: asks the study for trials and runs each in a child process."""

    def __init__(self, opts: SweepOptions, console=None):
        self.opts, self.console = opts, console
        self.optuna = import_optuna()
        self.storage_url = opts.storage or default_storage(opts.runs_dir, opts.study)
        self.storage = open_storage(self.storage_url, opts.heartbeat)
        self.study = self._study()
        self.stop_signal: int | None = None
        self.child: subprocess.Popen | _Forked | None = None

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)  # trial params, notes: printed as written

    # -- the study ---------------------------------------------------------
    def _study(self):
        o, optuna = self.opts, self.optuna
        attrs_wanted = {"metric": o.metric, "objective": o.objective, "space": o.space.describe()}
        try:
            study = optuna.create_study(study_name=o.study, storage=self.storage, direction=o.direction,
                                        sampler=optuna.samplers.TPESampler(seed=o.seed), pruner=_pruner(o.pruner, o.prune_after))
            for k, v in attrs_wanted.items():
                study.set_user_attr(k, v)
            for row in o.space.enqueue:  # only the worker that created the study enqueues
                study.enqueue_trial(row)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=o.study, storage=self.storage,
                                      sampler=optuna.samplers.TPESampler(seed=o.seed), pruner=_pruner(o.pruner, o.prune_after))
            have = study.user_attrs
            if study.direction.name.lower() != o.direction:
                raise DdpmkitError(f"study '{o.study}' was created to {study.direction.name.lower()}, "
                                   f"not {o.direction}") from None
            for k, v in attrs_wanted.items():
                if k in have and json.dumps(have[k], sort_keys=True) != json.dumps(v, sort_keys=True):
                    raise DdpmkitError(f"study '{o.study}' was created with another {k} ({_short(have[k])}); "
                                       f"use the same one, or a new --study") from None
        meta = {"study": o.study, "storage": masked(self.storage_url), "metric": o.metric, "objective": o.objective,
                "direction": o.direction, "space": o.space.describe(), "trials": o.trials}
        _study_dir(o).mkdir(parents=True, exist_ok=True)
        _write_json(_study_dir(o) / "study.json", meta)
        return study

    def _lineages(self) -> tuple[int, int]:
        """(trials started or done, counting a retried trial once; trials waiting to be run)."""
        TS = self.optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get(RETRY_OF) for t in trials} - {None}
        started = sum(1 for t in trials if t.state != TS.WAITING and t.number not in retried)
        waiting = sum(1 for t in trials if t.state == TS.WAITING)
        return started, waiting

    # -- the loop ----------------------------------------------------------
    def run(self) -> int:
        """Run trials until the study has ``trials`` of them; returns how many this worker ran."""
        ran = 0
        with self._signals():
            while self.stop_signal is None:
                with _quiet(self.optuna):
                    self.optuna.storages.fail_stale_trials(self.study)
                with ask_lock(self.storage, self.storage_url, self.opts.study):
                    started, waiting = self._lineages()
                    if started >= self.opts.trials and not waiting:
                        break
                    trial = self.study.ask()
                self.run_trial(trial)
                ran += 1
        if self.stop_signal is not None:
            raise SweepStopped(self.stop_signal)
        return ran

    @contextlib.contextmanager
    def _signals(self):
        def on_signal(signum, frame):
            self.stop_signal = signum
            if self.child is not None and self.child.poll() is None:
                _stop_run(self.child, self._current_dir)

        with on_stop_signals(on_signal):
            yield

    def run_trial(self, trial) -> str:
        o, TS = self.opts, self.optuna.trial.TrialState
        number = trial.number
        values = {p.name: p.suggest(trial) for p in o.space.params}
        run_dir = _trial_dir(o, number)
        self._current_dir = run_dir
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        retry_of = trial.user_attrs.get(RETRY_OF)
        changes, overrides = trial_user_options(o, number)
        try:
            config = trial_config(o.space.preset, values, changes, overrides)
        except DdpmkitError:  # a combination the corners of the space did not show: fail it, say why
            self.study.tell(trial, state=TS.FAIL)
            raise
        logs = _study_dir(o) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"trial-{number:04d}.log"
        resumed_from = None
        old_dir = _trial_dir(o, retry_of) if retry_of is not None else None
        if old_dir is not None and (old_dir / "checkpoints").is_dir() and any((old_dir / "checkpoints").iterdir()):
            if run_dir.exists():
                shutil.rmtree(run_dir)
            shutil.copytree(old_dir, run_dir, ignore=shutil.ignore_patterns(".ddpmkit.lock", "trial.json", "tb"))
            cfg_path, resumed_from = None, str(old_dir)
        else:
            cfg_path = _study_dir(o) / "configs" / f"trial-{number:04d}.json"
            _write_json(cfg_path, config.to_dict())
        spec = TrialSpec(str(run_dir), o.device, None if cfg_path is None else str(cfg_path), self.storage_url, o.study,
                         number, o.objective, o.pruner, o.prune_after)
        shown = ", ".join(f"{p.name}={_fmt(values[p.name])}" for p in o.space.searched)
        self.say(f"trial {number}: {shown}" + (f" (resumes trial {retry_of})" if resumed_from else ""))
        t0 = time.time()
        outcome = self._watch(trial, spec, run_dir, log_path)
        state, value, pruned_at, note = outcome.state, outcome.value, outcome.pruned_at, outcome.note
        record = {"study": o.study, "number": number, "params": values, "state": state.value, "value": value,
                  "objective": f"{o.metric}:{o.objective}", "direction": o.direction,
                  "seconds": round(time.time() - t0, 1), "log": str(log_path), "resumed_from": resumed_from}
        if pruned_at is not None:
            record["pruned_at_step"] = pruned_at
        if note:
            record["note"] = note
        if run_dir.is_dir():
            _write_json(run_dir / "trial.json", record)
        if state is TrialState.COMPLETE:
            self.study.tell(trial, value)
            self.say(f"trial {number}: {o.objective} = {value:.6g} ({record['seconds']:.0f} s)")
        elif state is TrialState.PRUNED:
            self.study.tell(trial, state=TS.PRUNED)
            self.say(f"trial {number}: pruned at step {pruned_at} ({note})")
        elif state is TrialState.STOPPED:  # this worker was asked to stop: the trial goes back in the queue
            self.study.tell(trial, state=TS.FAIL)
            requeue(self.study, self.study.get_trials(deepcopy=False)[number])
            self.say(f"trial {number}: stopped; it is queued again and will resume from its checkpoint")
        else:
            self.study.tell(trial, state=TS.FAIL)
            self.say(f"trial {number}: failed ({note})")
        if state is TrialState.MISSING:
            raise DdpmkitError(note)
        return state.value

    def _watch(self, trial, spec: TrialSpec, run_dir: Path, log_path: Path) -> TrialOutcome:
        """Run the trial's process (which reports its evaluations and prunes itself, see
        :class:`~ddpmkit.sweep.launch.TrialReporter`), heartbeating the trial while it runs."""
        o, key = self.opts, self.opts.objective
        study_id = self.storage.get_study_id_from_name(o.study)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        last_beat = 0.0
        with open(log_path, "ab") as log:
            self.child = _start(spec, o.nproc_per_trial, log, o.start_method)
            try:
                while (rc := self.child.poll()) is None:
                    if o.heartbeat and time.time() - last_beat >= o.heartbeat / 2:
                        self.storage.record_heartbeat(trial_id)
                        last_beat = time.time()
                    time.sleep(0.2)
            finally:
                if self.child.poll() is None:  # an exception here: do not leave the run behind
                    _stop_run(self.child, run_dir)
                    self.child.wait()
                rc, self.child = self.child.returncode, None
        if rc == PRUNED_EXIT:
            frozen = self.storage.get_trial(trial_id)
            step = int(frozen.user_attrs["pruned_at_step"])
            value = frozen.intermediate_values[step]
            return TrialOutcome(TrialState.PRUNED, None, step,
                                f"{key} = {value:.6g} at step {step}: pruned by the {o.pruner} pruner")
        if self.stop_signal is not None and rc != 0:
            return TrialOutcome(TrialState.STOPPED, note=f"signal {self.stop_signal}")
        if rc != 0:
            return TrialOutcome(TrialState.FAILED, note=_last_error(log_path, rc))
        results = _read_json(run_dir / "eval.json").get("results", {})
        if key not in results:
            return TrialOutcome(TrialState.MISSING, note=f"metric '{o.metric}' gave no '{key}' in "
                                f"{run_dir / 'eval.json'}; it gave: {', '.join(results) or '(nothing)'}")
        value = float(results[key])
        if not math.isfinite(value):
            return TrialOutcome(TrialState.FAILED, note=f"{key} is {value}")
        return TrialOutcome(TrialState.COMPLETE, value)


class SweepStopped(Interrupted):
    """The worker stopped on a signal; its running trial was checkpointed and queued again."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name}: the sweep stopped; the trial it was running is queued again "
                         "and resumes from its checkpoint. Run the same command to continue.", signum)
