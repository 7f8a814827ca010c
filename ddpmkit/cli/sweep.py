"""``ddpmkit sweep``: an Optuna study over run options."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ddpmkit.cli import _common
from ddpmkit.cli._common import (
    _cell,
    _parse_sets,
    err_console,
    plain,
)
from ddpmkit.errors import DdpmkitError
from ddpmkit.sdk.kinds import KINDS


@click.command()
@click.option("--space", "space_file", type=click.Path(dir_okay=False), default=None,
              help="Search space (TOML): lr = {log_uniform = [1e-4, 1e-2]}, schedule = [\"linear\", \"cosine\"], "
                   "\"schedule.timesteps\" = {int = [100, 1000]}, fixed values, preset = \"laptop\".")
@click.option("--metric", default=None, help="The metric each trial is scored by (a metric plugin), e.g. digit-score.")
@click.option("--objective", default=None, help="Which of the metric's results (default: its first, e.g. digit_is).")
@click.option("--direction", type=click.Choice(["maximize", "minimize"]), default=None,
              help="Whether the objective is better high or low (default: as the metric says).")
@click.option("--trials", type=int, default=20, show_default=True, help="Trials in the study, all workers together.")
@click.option("--study", default=None, help="Study name (default: the space file's name); trials go to RUNS/STUDY/trial-NNNN.")
@click.option("--storage", default=None,
              help="Optuna storage URL shared by the workers (default sqlite:///RUNS/STUDY/optuna.db), e.g. "
                   "postgresql+psycopg://user@host:5432/db.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("--pruner", type=click.Choice(["median", "halving", "none"]), default="median", show_default=True,
              help="Stop poor trials early on their --eval-every results.")
@click.option("--prune-after", type=int, default=3, show_default=True,
              help="Completed trials before the median pruner compares a trial with them.")
@click.option("--eval-every", type=int, default=None, help="Score every N epochs (reported to the pruner).")
@click.option("--eval-samples", type=int, default=None, help="Images sampled per evaluation.")
@click.option("--set", "sets", multiple=True, metavar="KIND.OPTION=VALUE", help="A component option for every trial.")
@click.option("--logger", "logger_names", multiple=True,
              help="Loggers of every trial (jsonl always); with mlflow each trial is a run nested under the study's.")
@click.option("--seed", type=int, default=None, help="Seed of Optuna's TPE sampler (give each worker its own).")
@click.option("--device", default="auto", show_default=True)
@click.option("--nproc-per-trial", type=int, default=1, show_default=True,
              help="Processes per trial: > 1 runs each trial under torchrun (e.g. one per GPU).")
@click.option("--heartbeat", type=int, default=30, show_default=True,
              help="Seconds between heartbeats; a running trial silent for twice that is failed and queued again.")
@click.option("--show", is_flag=True, help="Print the study's best trials and write its plots; run nothing.")
@click.option("--top", type=int, default=10, show_default=True, help="Trials --show lists.")
def sweep(space_file, metric, objective, direction, trials, study, storage, runs_dir, pruner, prune_after, eval_every,
          eval_samples, sets, logger_names, seed, device, nproc_per_trial, heartbeat, show, top):
    """Search hyperparameters with Optuna: each trial is a run directory; start the same command on several
    machines (one --storage) to share the study. --show prints the results."""
    from ddpmkit import sweep as sw

    runs = Path(runs_dir)
    if show:
        if study is None and space_file is None:
            raise DdpmkitError("--show needs --study NAME (or the --space file it was named after)")
        _show_study(sw, study or Path(space_file).stem, storage, runs, metric, top)
        return
    if space_file is None or metric is None:
        raise DdpmkitError("ddpmkit sweep needs --space SPACE.toml and --metric NAME (or --show --study NAME)")
    for flag, value in (("--trials", trials), ("--nproc-per-trial", nproc_per_trial), ("--heartbeat", heartbeat)):
        if value < 1:
            raise DdpmkitError(f"{flag} must be >= 1, got {value}")
    if prune_after < 0:
        raise DdpmkitError(f"--prune-after must be >= 0, got {prune_after}")
    sw.import_optuna()
    objective, direction = sw.objective_of(metric, objective, direction)
    opts = sw.SweepOptions(space=None, metric=metric, objective=objective, direction=direction, trials=trials,
                           study=study or Path(space_file).stem, storage=storage, runs_dir=runs, pruner=pruner,
                           prune_after=prune_after, seed=seed, eval_every=eval_every, eval_samples=eval_samples,
                           overrides=_parse_sets(sets, KINDS, "sweep"), loggers=tuple(logger_names), device=device,
                           nproc_per_trial=nproc_per_trial, heartbeat=heartbeat,
                           # the ddpmkit command runs nothing with torch before its trials: it can fork them itself
                           start_method="fork" if _common.COMMAND else "forkserver")
    changes, overrides = sw.trial_user_options(opts, 0)
    opts.space = sw.load_space(space_file, changes, overrides)
    worker = sw.Worker(opts, console=err_console)
    from ddpmkit.run.presets import preset_config

    if pruner != "none" and not (eval_every or dict((p.name, p.values[0]) for p in opts.space.params
                                                     if p.kind == "fixed").get("eval_every")
                                 or preset_config(opts.space.preset).eval_every):
        warnings.warn("no --eval-every: trials report only their final score, so the pruner never stops one",
                      stacklevel=1)
    click.echo(f"study {opts.study}: {opts.metric}:{objective} ({direction}), {trials} trials, storage "
               f"{sw.masked(worker.storage_url)}", err=True)
    t0 = time.perf_counter()
    ran = worker.run()
    click.echo(f"This worker ran {ran} trials in {time.perf_counter() - t0:.0f} s.")
    _show_study(sw, opts.study, worker.storage_url, runs, None, top, storage_obj=worker.storage)


def _show_study(sw, name, storage_url, runs: Path, metric, top, storage_obj=None):
    """The study's best trials as a table; sweep.json, history.png and importance.png in RUNS/STUDY/."""
    url = storage_url or sw.default_storage(runs, name)
    if storage_url is None and not (runs / name / "optuna.db").exists():
        raise DdpmkitError(f"no study '{name}' under {runs}/ (no {runs / name / 'optuna.db'}); give --storage URL "
                           "if it lives elsewhere")
    storage = storage_obj or sw.open_storage(url, heartbeat=None)
    study = sw.load_study(name, storage)
    info = sw.summary(study)
    if metric is not None and info.get("metric") not in (None, metric):
        raise DdpmkitError(f"study '{name}' scores {info['metric']}:{info.get('objective')}, not {metric}")
    done = [t for t in info["trials"] if t["state"] == "complete"]
    if not done:
        states = ", ".join(f"{t['number']}: {t['state']}" for t in info["trials"]) or "none"
        raise DdpmkitError(f"study '{name}' has no completed trial with a value of {info.get('objective', 'its metric')} "
                           f"yet (trials: {states})")
    out_dir = runs / name
    out_dir.mkdir(parents=True, exist_ok=True)
    from ddpmkit.sdk.files import write_json

    write_json(out_dir / "sweep.json", info)
    plots = sw.write_plots(study, out_dir)
    reverse = info["direction"] == "maximize"
    params = sorted({k for t in done for k in t["params"]})
    table = Table(title=plain(f"study {name}: best of {len(done)} completed ({info.get('metric')}:"
                              f"{info.get('objective')}, {info['direction']})"), title_justify="left")
    for col in ("trial", info.get("objective", "value"), *params, "run directory"):
        table.add_column(plain(col), justify="right" if col not in ("run directory",) else "left")
    for t in sorted(done, key=lambda t: t["value"], reverse=reverse)[:top]:
        table.add_row(str(t["number"]), f"{t['value']:.6g}", *[plain(_cell(t["params"].get(k))) for k in params],
                      plain(t["run_dir"] or ""))
    Console(width=max(120, Console().width)).print(table)
    counts = {}
    for t in info["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    click.echo("trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for p in [out_dir / "sweep.json", *plots]:
        click.echo(f"Wrote {p}")
