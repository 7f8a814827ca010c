"""Hyperparameter sweeps on Optuna: ``ddpmkit sweep``.

A sweep is an Optuna study. The search space is a TOML file::

    preset = "laptop"                          # fixed: the starting configuration
    max_steps = 300                            # fixed RunConfig field
    lr = {log_uniform = [1e-4, 1e-2]}          # float, log scale
    schedule = ["linear", "cosine"]            # categorical: a component by name
    "schedule.timesteps" = {int = [100, 1000], step = 100}   # a component option
    "predictor.dropout" = {uniform = [0.0, 0.2]}

Keys are RunConfig fields (``lr``, ``batch_size``, ``max_steps``, ``ema_decay``, ``prediction``, ...),
component names (``schedule``, ``loss``, ``predictor``, ``sampler``, ``dataset``, ``timestep_sampler``) or
component options (``KIND.OPTION``). A value is fixed (a scalar), a choice (a list), or a range: a table
with one of ``uniform``, ``log_uniform``, ``int``, ``log_int`` (``[low, high]``, both included; ``step``
optional) or ``choice``. ``[[enqueue]]`` tables name trials to run first (e.g. the preset's own values, as
a baseline measured the same way)::

    [[enqueue]]
    lr = 2e-3
    schedule = "linear"
    "schedule.timesteps" = 1000

Each trial is an ordinary run directory, ``RUNS/<study>/trial-NNNN/``, trained by ``ddpmkit run`` in a
process of its own (or by torchrun, ``--nproc-per-trial``). The worker that started it watches the
run's ``metrics.jsonl``: every ``--eval-every`` evaluation is reported to Optuna, and when the pruner says
stop, the run gets SIGTERM (it checkpoints and exits) and the trial is PRUNED; ``trial.json`` in the
directory says so. A trial whose run fails (an exception, a NaN loss) is FAILED and the sweep goes on.

Workers share a study through its storage (``--storage``; default an SQLite file in ``RUNS/<study>/``; any
SQLAlchemy URL, e.g. ``postgresql+psycopg://user@host/db``): start the same command on several machines.
Each worker records a heartbeat for its running trial. A trial whose worker stopped (SIGINT/SIGTERM: the
run checkpoints first) or died (SIGKILL: the run gets SIGTERM from the kernel and checkpoints; the trial
goes stale after two heartbeats) is marked FAILED and enqueued again with the same parameters; the retry
starts from a copy of the stopped run directory and *resumes from its newest checkpoint*.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import attrs

from .errors import DdpmkitError, Interrupted
from .kinds import KINDS, SECTIONS

RANGE_KINDS = ("uniform", "log_uniform", "int", "log_int", "choice")
# RunConfig fields a space may not set: the sweep owns them, or they are lists of components.
NOT_SWEPT = {"preset", "metrics", "metric_options", "loggers", "logger_options"} | set(SECTIONS)
RETRY_OF = "ddpmkit.retry_of"  # user attribute of a trial that continues a stopped one (its number)


def _missing_optuna():
    return DdpmkitError("ddpmkit sweep needs Optuna: pip install 'ddpmkit[sweep]'")


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise _missing_optuna() from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# --------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------
@attrs.frozen
class Param:
    """One entry of a search space: ``kind`` is ``fixed``, ``choice`` or a range kind."""

    name: str
    kind: str
    values: tuple = ()  # fixed: (value,); choice: the choices; ranges: (low, high)
    step: float | int | None = None

    def suggest(self, trial) -> Any:
        """The value for ``trial`` (an optuna Trial; an enqueued trial gets its stored value back)."""
        lo, hi = self.values[:2] if self.kind not in ("fixed", "choice") else (None, None)
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind in ("uniform", "log_uniform"):
            return trial.suggest_float(self.name, lo, hi, log=self.kind == "log_uniform", step=self.step)
        return trial.suggest_int(self.name, lo, hi, log=self.kind == "log_int", step=int(self.step or 1))

    def describe(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), **({"step": self.step} if self.step else {})}


@attrs.frozen
class Space:
    preset: str | None
    params: tuple[Param, ...]
    enqueue: tuple[dict, ...] = ()

    @property
    def searched(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kind != "fixed")

    def describe(self) -> dict:
        return {"preset": self.preset, **{p.name: p.describe() for p in self.params},
                **({"enqueue": list(self.enqueue)} if self.enqueue else {})}


def _target(name: str, where: str) -> tuple[str, ...]:
    """Where a space key goes: ("component", section), ("option", kind, option) or ("field", name)."""
    from .config import RunConfig

    fields = sorted(f.name for f in attrs.fields(RunConfig) if f.name not in NOT_SWEPT)
    if name in SECTIONS:
        return ("component", name)
    kind, dot, option = name.partition(".")
    if dot:
        if kind not in KINDS or not option:
            raise DdpmkitError(f"{where}: unknown parameter '{name}': KIND.OPTION needs a kind among {', '.join(KINDS)}")
        return ("option", kind, option)
    if name in fields:
        return ("field", name)
    close = difflib.get_close_matches(name, fields + list(SECTIONS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise DdpmkitError(f"{where}: unknown parameter '{name}'{hint} (a RunConfig field such as lr or max_steps, a "
                       f"component ({', '.join(SECTIONS)}) or KIND.OPTION)")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _param(name: str, value: Any, where: str) -> Param:
    label = f"{where}: '{name}'"
    if isinstance(value, list):
        value = {"choice": value}
    if not isinstance(value, dict):
        return Param(name, "fixed", (value,))
    kinds = [k for k in value if k in RANGE_KINDS]
    extra = sorted(set(value) - set(RANGE_KINDS) - {"step"})
    if len(kinds) != 1 or extra:
        raise DdpmkitError(f"{label} is malformed: write one of {', '.join(k + ' = [...]' for k in RANGE_KINDS)} "
                           f"(and optionally step), got {{{', '.join(value)}}}")
    kind, body, step = kinds[0], value[kinds[0]], value.get("step")
    if kind == "choice":
        if not isinstance(body, list) or not body or len({json.dumps(v) for v in body}) != len(body) \
                or not all(isinstance(v, (str, int, float, bool)) for v in body):
            raise DdpmkitError(f"{label}: a choice is a non-empty list of distinct strings or numbers, got {body!r}")
        return Param(name, "choice", tuple(body))
    ok = isinstance(body, list) and len(body) == 2 and all(map(_number, body)) and body[0] < body[1]
    if ok and kind in ("int", "log_int"):
        ok = all(isinstance(v, int) for v in body)
    if ok and kind.startswith("log"):
        ok = body[0] > 0
    if not ok:
        need = "integers" if "int" in kind else "numbers"
        extra_rule = " with 0 < low" if kind.startswith("log") else ""
        raise DdpmkitError(f"{label}: {kind} needs [low, high], two {need}{extra_rule} and low < high, got {body!r}")
    if step is not None and (not _number(step) or step <= 0 or kind.startswith("log")):
        raise DdpmkitError(f"{label}: step must be a positive number and cannot go with a log scale, got {step!r}")
    return Param(name, kind, tuple(body), step)


def load_space(path: str | os.PathLike, base_changes: dict | None = None, base_overrides: dict | None = None) -> Space:
    """Read and check a search-space TOML file (every name known, every range well formed, every
    value one that a run accepts, with the sweep's own ``base_changes``/``base_overrides`` applied);
    a problem → one-line :class:`DdpmkitError`."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DdpmkitError(f"--space: no such file '{path}'") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DdpmkitError(f"--space: '{path}' is not TOML ({exc})") from None
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise DdpmkitError(f"{where}: preset is fixed: a name such as \"laptop\", got {preset!r}")
    enqueue = data.pop("enqueue", [])
    params = []
    for name, value in data.items():
        _target(name, where)
        params.append(_param(name, value, where))
    space = Space(preset, tuple(params), tuple(enqueue) if isinstance(enqueue, list) else ())
    if not space.searched:
        raise DdpmkitError(f"{where}: nothing to search: give at least one list or range")
    _check_enqueue(space, enqueue, where)
    _check_values(space, where, base_changes, base_overrides)
    return space


def _check_enqueue(space: Space, enqueue, where: str) -> None:
    """Each ``[[enqueue]]`` table sets searched parameters only, each to a value its range or choice allows."""
    searched = {p.name: p for p in space.searched}
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise DdpmkitError(f"{where}: enqueue is a list of tables: [[enqueue]] then name = value lines")
    for i, row in enumerate(enqueue, 1):
        for name, value in row.items():
            p = searched.get(name)
            if p is None:
                raise DdpmkitError(f"{where}: [[enqueue]] #{i} sets '{name}', which is not searched "
                                   f"(searched: {', '.join(searched)})")
            ok = value in p.values if p.kind == "choice" else (_number(value) and p.values[0] <= value <= p.values[1])
            if not ok:
                allowed = list(p.values) if p.kind == "choice" else f"[{p.values[0]}, {p.values[1]}]"
                raise DdpmkitError(f"{where}: [[enqueue]] #{i}: {name} = {value!r} is outside {allowed}")


def _corners(space: Space) -> list[dict]:
    """Assignments that together try every choice and both ends of every range."""
    rows = []
    width = max([len(p.values) for p in space.searched] + [1])
    for i in range(width):
        row = {}
        for p in space.params:
            if p.kind == "fixed":
                row[p.name] = p.values[0]
            elif p.kind == "choice":
                row[p.name] = p.values[i % len(p.values)]
            else:
                row[p.name] = p.values[i % 2]
        rows.append(row)
    return rows


def _check_values(space: Space, where: str, base_changes: dict | None, base_overrides: dict | None) -> None:
    # Component choices first (a bad name gets its own line), then options against every component chosen.
    for p in space.params:
        if _target(p.name, where)[0] == "component":
            from .plugins import get_component

            for name in (p.values if p.kind in ("fixed", "choice") else ()):
                get_component(p.name, str(name))
    for row in _corners(space):
        try:
            trial_config(space.preset, row, base_changes, base_overrides)
        except DdpmkitError as exc:
            raise DdpmkitError(f"{where}: {exc}") from None


def trial_config(preset: str | None, values: dict[str, Any], base_changes: dict | None = None,
                 base_overrides: dict | None = None):
    """The RunConfig of a trial: ``preset`` with the space's ``values`` (``{key: value}``) applied."""
    from .config import resolve_run_config

    names: dict[str, str] = {}
    overrides: dict[str, dict[str, str]] = {k: dict(v) for k, v in (base_overrides or {}).items()}
    changes: dict[str, Any] = dict(base_changes or {})
    for key, value in values.items():
        target = _target(key, "space")
        if target[0] == "component":
            names[key] = str(value)
        elif target[0] == "option":
            overrides.setdefault(target[1], {})[target[2]] = str(value).lower() if isinstance(value, bool) else str(value)
        else:
            changes[key] = value
    for kind, field in (("metric", "metric_options"), ("logger", "logger_options")):
        if kind in overrides:
            changes[field] = {**changes.get(field, {}), **overrides.pop(kind)}
    if changes.get("ema_decay") == 0:
        changes["ema_decay"] = None
    return resolve_run_config(preset, names, overrides, changes)


# --------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------
def objective_of(metric: str, objective: str | None, direction: str | None) -> tuple[str, str]:
    """``(result key, "maximize"|"minimize")`` for ``metric``: the metric plugin's ``directions`` say which
    results it has and which way is better; a metric without them needs ``objective`` and ``direction``."""
    from .plugins import get_component

    comp = get_component("metric", metric)
    known: dict[str, str] = dict(getattr(comp.factory, "directions", None) or {})
    if objective is None:
        if not known:
            raise DdpmkitError(f"metric '{metric}' does not say which of its results to optimise: give --objective KEY "
                               "and --direction maximize|minimize")
        objective = next(iter(known))
    elif known and objective not in known:
        raise DdpmkitError(f"metric '{metric}' has no result '{objective}'; it gives: {', '.join(known)}")
    direction = direction or known.get(objective)
    if direction is None:
        raise DdpmkitError(f"say whether '{objective}' is better high or low: --direction maximize|minimize")
    return objective, direction


# --------------------------------------------------------------------------
# Storage and study
# --------------------------------------------------------------------------
def masked(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(//[^:/@]+:)[^@/]+@", r"\1***@", url)


def open_storage(url: str, heartbeat: int | None = 30):
    """An Optuna RDBStorage on ``url`` (SQLite, PostgreSQL, MySQL ... through SQLAlchemy) with heartbeats;
    an unreachable or malformed URL → one line."""
    optuna = _import_optuna()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": int(heartbeat), "heartbeat_stale_trial_callback": requeue}
    try:
        for attempt in range(8):  # workers started together race to create the schema: the losers try again
            try:
                with _quiet(optuna):
                    return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
            except Exception as exc:
                if attempt == 7 or type(exc).__name__ not in ("IntegrityError", "ProgrammingError") \
                        and "already exists" not in str(exc) and "locked" not in str(exc):
                    raise
                time.sleep(0.5 + 0.5 * attempt)
    except ImportError as exc:
        raise DdpmkitError(f"--storage {masked(url)}: its database driver is not installed ({exc})") from None
    except Exception as exc:  # sqlalchemy.exc.ArgumentError / OperationalError, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DdpmkitError(f"cannot open the study storage {masked(url)}: {msg}") from None


@contextlib.contextmanager
def _quiet(optuna):
    """Optuna's notes that heartbeats are experimental and meant for Study.optimize: this worker records the
    heartbeats itself (ask-and-tell, one process per trial)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        yield


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several workers on one file wait for its lock
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


def requeue(study, trial) -> None:
    """Enqueue a stopped trial's parameters again; the retry resumes its run directory (``RETRY_OF``)."""
    optuna = _import_optuna()
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={RETRY_OF: trial.number, **{k: v for k, v in trial.user_attrs.items() if k == "run_dir"}}))


def load_study(name: str, storage):
    optuna = _import_optuna()
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise DdpmkitError(f"no study '{name}' in that storage; studies there: {', '.join(known) or '(none)'}") from None


def default_storage(runs_dir: Path, study: str) -> str:
    return f"sqlite:///{(runs_dir / study / 'optuna.db').resolve()}"


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


def _pruner(name: str, prune_after: int = 3):
    optuna = _import_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _study_dir(opts: SweepOptions) -> Path:
    return opts.runs_dir / opts.study


def _trial_dir(opts: SweepOptions, number: int) -> Path:
    return _study_dir(opts) / f"trial-{number:04d}"


def _mlflow_parent(opts: SweepOptions, study) -> str | None:
    """The MLflow run the trials nest under: made by the worker that creates the study, found by the others."""
    if "mlflow" not in opts.loggers:
        return None
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        return run_id
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise DdpmkitError("--logger mlflow needs MLflow: pip install 'ddpmkit[mlflow]'") from None
    lopts = opts.overrides.get("logger", {})
    client = MlflowClient(tracking_uri=lopts.get("tracking_uri"))
    exp_name = lopts.get("experiment", "ddpmkit")
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
    found = client.search_runs([exp_id], f"tags.`ddpmkit.study` = '{opts.study}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(exp_id, run_name=opts.study, tags={"ddpmkit.study": opts.study}).info.run_id
        client.log_param(run_id, "metric", f"{opts.metric}:{opts.objective}")
        client.log_param(run_id, "direction", opts.direction)
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def _trial_user_options(opts: SweepOptions, number: int, parent_run: str | None) -> tuple[dict, dict]:
    """RunConfig changes and component overrides every trial gets from the sweep's own flags."""
    changes: dict[str, Any] = {"metrics": (opts.metric,)}
    if opts.eval_every is not None:
        changes["eval_every"] = opts.eval_every
    if opts.eval_samples is not None:
        changes["eval_samples"] = opts.eval_samples
    overrides = {k: dict(v) for k, v in opts.overrides.items()}
    if opts.loggers:
        changes["loggers"] = tuple(dict.fromkeys(("jsonl",) + tuple(opts.loggers)))
    if parent_run:
        overrides.setdefault("logger", {}).update({"parent_run_id": parent_run, "run_name": f"trial-{number:04d}"})
    return changes, overrides


class Worker:
    """One ``ddpmkit sweep`` process: asks the study for trials and runs each in a child process."""

    def __init__(self, opts: SweepOptions, console=None):
        self.opts, self.console = opts, console
        self.optuna = _import_optuna()
        self.storage_url = opts.storage or default_storage(opts.runs_dir, opts.study)
        self.storage = open_storage(self.storage_url, opts.heartbeat)
        self.study = self._study()
        self.parent_run = _mlflow_parent(opts, self.study)
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
                raise DdpmkitError(f"study '{o.study}' was created to {study.direction.name.lower()}, not {o.direction}")
            for k, v in attrs_wanted.items():
                if k in have and json.dumps(have[k], sort_keys=True) != json.dumps(v, sort_keys=True):
                    raise DdpmkitError(f"study '{o.study}' was created with another {k} ({_short(have[k])}); "
                                       f"use the same one, or a new --study")
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
                started, waiting = self._lineages()
                if started >= self.opts.trials and not waiting:
                    break
                self.run_trial(self.study.ask())
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

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run_trial(self, trial) -> str:
        o, TS = self.opts, self.optuna.trial.TrialState
        number = trial.number
        values = {p.name: p.suggest(trial) for p in o.space.params}
        run_dir = _trial_dir(o, number)
        self._current_dir = run_dir
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        retry_of = trial.user_attrs.get(RETRY_OF)
        changes, overrides = _trial_user_options(o, number, self.parent_run)
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
            spec = {"resume": True, "config": None, "run_dir": str(run_dir), "device": o.device}
            resumed_from = str(old_dir)
        else:
            cfg_path = _study_dir(o) / "configs" / f"trial-{number:04d}.json"
            _write_json(cfg_path, config.to_dict())
            spec = {"resume": False, "config": str(cfg_path), "run_dir": str(run_dir), "device": o.device}
        shown = ", ".join(f"{p.name}={_fmt(values[p.name])}" for p in o.space.searched)
        self.say(f"trial {number}: {shown}" + (f" (resumes trial {retry_of})" if resumed_from else ""))
        t0 = time.time()
        state, value, pruned_at, note = self._watch(trial, spec, run_dir, log_path)
        record = {"study": o.study, "number": number, "params": values, "state": state, "value": value,
                  "objective": f"{o.metric}:{o.objective}", "direction": o.direction,
                  "seconds": round(time.time() - t0, 1), "log": str(log_path), "resumed_from": resumed_from}
        if pruned_at is not None:
            record["pruned_at_step"] = pruned_at
        if note:
            record["note"] = note
        if run_dir.is_dir():
            _write_json(run_dir / "trial.json", record)
        if state == "complete":
            self.study.tell(trial, value)
            self.say(f"trial {number}: {o.objective} = {value:.6g} ({record['seconds']:.0f} s)")
        elif state == "pruned":
            self.study.tell(trial, state=TS.PRUNED)
            self.say(f"trial {number}: pruned at step {pruned_at} ({note})")
        elif state == "stopped":  # this worker was asked to stop: the trial goes back in the queue
            self.study.tell(trial, state=TS.FAIL)
            requeue(self.study, self.study.get_trials(deepcopy=False)[number])
            self.say(f"trial {number}: stopped; it is queued again and will resume from its checkpoint")
        else:
            self.study.tell(trial, state=TS.FAIL)
            self.say(f"trial {number}: failed ({note})")
        if self.parent_run and value is not None:
            _mlflow_log_trial(self.opts, self.parent_run, number, value)
        if state == "missing":
            raise DdpmkitError(note)
        return state

    def _watch(self, trial, spec: dict, run_dir: Path, log_path: Path):
        """Run the trial's process; report each evaluation; prune; heartbeat. → (state, value, step, note)."""
        o = self.opts
        key = o.objective
        study_id = self.storage.get_study_id_from_name(o.study)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        reported: dict[int, float] = {}  # step → value told to Optuna
        pruned_at = None
        last_beat = 0.0
        with open(log_path, "ab") as log:
            self.child = _start(spec, o.nproc_per_trial, log, o.start_method)
            try:
                while True:
                    rc = self.child.poll()
                    now = time.time()
                    if o.heartbeat and now - last_beat >= o.heartbeat / 2:
                        self.storage.record_heartbeat(trial_id)
                        last_beat = now
                    for step, value in _evaluations(run_dir / "metrics.jsonl", key):
                        if step in reported or pruned_at is not None:
                            continue
                        reported[step] = value
                        trial.report(value, step)
                        if trial.should_prune():
                            pruned_at = step
                            _stop_run(self.child, run_dir)
                    if rc is not None:
                        break
                    time.sleep(0.5)
            finally:
                if self.child.poll() is None:  # an exception here: do not leave the run behind
                    _stop_run(self.child, run_dir)
                    self.child.wait()
                rc, self.child = self.child.returncode, None
        if pruned_at is not None:
            value = reported[pruned_at]
            return "pruned", None, pruned_at, f"{key} = {value:.6g} at step {pruned_at}: pruned by the {o.pruner} pruner"
        if self.stop_signal is not None and rc != 0:
            return "stopped", None, None, f"signal {self.stop_signal}"
        if rc != 0:
            return "failed", None, None, _last_error(log_path, rc)
        results = _read_json(run_dir / "eval.json").get("results", {})
        if key not in results:
            return ("missing", None, None, f"metric '{o.metric}' gave no '{key}' in {run_dir / 'eval.json'}; "
                    f"it gave: {', '.join(results) or '(nothing)'}")
        value = float(results[key])
        if not math.isfinite(value):
            return "failed", None, None, f"{key} is {value}"
        return "complete", value, None, None


class SweepStopped(Interrupted):
    """The worker stopped on a signal; its running trial was checkpointed and queued again."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name}: the sweep stopped; the trial it was running is queued again "
                         "and resumes from its checkpoint. Run the same command to continue.", signum)


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
PRELOAD = ["ddpmkit.training", "ddpmkit.evaluation", "diffusers.models.unets.unet_2d"]


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

    from .config import load_config_file
    from .training import resumed_config, train

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
    from .rundir import pid_alive

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


def _evaluations(path: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of each evaluation during training (not the final one) in a metrics.jsonl that has ``key``."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        if '"eval"' not in line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        value = (rec.get("eval") or {}).get(key)
        if rec.get("final"):  # the run's last evaluation: its value is the trial's, told at the end, not pruned on
            continue
        if value is not None and math.isfinite(value):
            out.append((int(rec["step"]), float(value)))
    return out


def _last_error(log_path: Path, rc: int) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    return f"exit {rc}: " + ((errors or lines or ["no output"])[-1].strip()[:300]) + f" (log: {log_path})"


def _mlflow_log_trial(opts: SweepOptions, run_id: str, number: int, value: float) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=opts.overrides.get("logger", {}).get("tracking_uri"))
    client.log_metric(run_id, f"trial/{opts.objective}", value, step=number)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) < 80 else s[:77] + "..."


def _write_json(path: Path, data) -> None:
    from .checkpoint import write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------
def summary(study) -> dict:
    """Every trial of ``study`` (number, state, value, params, run directory) and the best one."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                       "run_dir": t.user_attrs.get("run_dir"), "retry_of": t.user_attrs.get(RETRY_OF),
                       "duration_s": t.duration.total_seconds() if t.duration else None,
                       "last_step": max(t.intermediate_values) if t.intermediate_values else None})
    done = [t for t in trials if t["state"] == "complete"]
    best = None
    if done:
        best = (max if study.direction.name == "MAXIMIZE" else min)(done, key=lambda t: t["value"])
    return {"study": study.study_name, "direction": study.direction.name.lower(), **study.user_attrs,
            "trials": trials, "best": best}


def write_plots(study, out_dir: Path) -> list[Path]:
    """The optimisation history and the parameter importances (Optuna's matplotlib plots) as PNGs."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = _import_optuna()
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = [("history.png", ovm.plot_optimization_history)]
    varied = [k for k in (complete[0].params if complete else {}) if len({json.dumps(t.params.get(k)) for t in complete}) > 1]
    if len(complete) >= 2 and varied:
        plots.append(("importance.png", ovm.plot_param_importances))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots:
            ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.set_size_inches(7, 4)
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            paths.append(out_dir / name)
    return paths
