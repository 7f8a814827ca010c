"""Hyperparameter sweeps on Optuna: ``ddpmkit sweep``.

A sweep is an Optuna study. The search space is a TOML file::

    preset = "laptop"                          # fixed: the starting configuration
    max_steps = 300                            # fixed RunConfig field
    lr = {log_uniform = [1e-4, 1e-2]}          # float, log scale
    schedule = ["linear", "cosine"]            # categorical: a component by name
    "schedule.timesteps" = {int = [100, 1000], step = 100}   # a component option
    "predictor.dropout" = {uniform = [0.0, 0.2]}

Keys are RunConfig fields (``lr``, ``batch_size``, ``max_steps``, ``ema_decay``, ``prediction``, ...),
component names (``schedule``, ``process``, ``loss``, ``predictor``, ``sampler``, ``dataset``,
``timestep_sampler``) or component options (``KIND.OPTION``; ``KIND.COMPONENT.OPTION`` for an option
set only in trials that choose that component, e.g. ``"process.flow.time"``). A value is fixed (a
scalar), a choice (a list), or a range: a table with one of ``uniform``, ``log_uniform``, ``int``,
``log_int`` (``[low, high]``, both included; ``step`` optional) or ``choice``. ``[[enqueue]]`` tables
name trials to run first (e.g. the preset's own values, as a baseline measured the same way)::

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

The parts: ``space`` (the grammar and a trial's configuration), ``study`` (Optuna storage and
studies), ``worker`` (the loop over trials), ``launch`` (one trial's process), ``results`` (summary,
plots). The names below are what the CLI and library users import.
"""

from ddpmkit.sweep.results import summary, write_plots
from ddpmkit.sweep.space import Param, Space, load_space, trial_config
from ddpmkit.sweep.study import (
    RETRY_OF,
    default_storage,
    import_optuna,
    load_study,
    masked,
    objective_of,
    open_storage,
)
from ddpmkit.sweep.worker import SweepOptions, SweepStopped, Worker, trial_user_options

__all__ = ["Param", "RETRY_OF", "Space", "SweepOptions", "SweepStopped", "Worker", "default_storage",
           "import_optuna", "load_space", "load_study", "masked", "objective_of", "open_storage", "summary",
           "trial_config", "trial_user_options", "write_plots"]
