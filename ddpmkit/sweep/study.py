"""Optuna studies: storage (SQLite by default, any SQLAlchemy URL such as PostgreSQL), resuming,
requeueing a stopped trial, the objective and the pruner.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from pathlib import Path

from ddpmkit.errors import DdpmkitError

RETRY_OF = "ddpmkit.retry_of"  # user attribute of a trial that continues a stopped one (its number)


def _missing_optuna():
    return DdpmkitError("ddpmkit sweep needs Optuna: pip install 'ddpmkit[sweep]'")


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise _missing_optuna() from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# --------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------
def objective_of(metric: str, objective: str | None, direction: str | None) -> tuple[str, str]:
    """``(result key, "maximize"|"minimize")`` for ``metric``: the metric plugin's ``directions`` say which
    results it has and which way is better; a metric without them needs ``objective`` and ``direction``."""
    from ddpmkit.sdk.registry import get_component

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
    optuna = import_optuna()
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
    optuna = import_optuna()
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={RETRY_OF: trial.number, **{k: v for k, v in trial.user_attrs.items() if k == "run_dir"}}))


def load_study(name: str, storage):
    optuna = import_optuna()
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise DdpmkitError(f"no study '{name}' in that storage; studies there: {', '.join(known) or '(none)'}") from None


def default_storage(runs_dir: Path, study: str) -> str:
    return f"sqlite:///{(runs_dir / study / 'optuna.db').resolve()}"


def _pruner(name: str, prune_after: int = 3):
    optuna = import_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


@contextlib.contextmanager
def ask_lock(storage, url: str, study: str):
    """One worker at a time between "is there room for another trial?" and ``study.ask()``: without it
    two workers can both see room for the last trial and make one too many. SQLite: a file lock beside
    the database (its workers share a host); PostgreSQL: an advisory lock on the study's name, held by
    a connection of the storage's own engine; other databases: none."""
    if url.startswith("sqlite:///"):
        import fcntl

        with open(url[len("sqlite:///"):] + ".ask.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha256(study.encode()).digest()[:8], "big", signed=True)
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    else:
        yield
