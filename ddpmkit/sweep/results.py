"""Results of a study: the summary JSON, the plots, and what a trial left (its evaluations, its last error)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ddpmkit.run.progress import cell
from ddpmkit.sweep.study import RETRY_OF, import_optuna


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


_fmt = cell


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) < 80 else s[:77] + "..."


def _write_json(path: Path, data) -> None:
    from ddpmkit.sdk.files import write_json

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

    optuna = import_optuna()
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
