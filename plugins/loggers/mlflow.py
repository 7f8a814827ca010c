"""Logger ``mlflow``: the run in an MLflow tracking store, through MLflow's public client API.

Parameters: the resolved configuration, flattened (``run.lr``, ``components.schedule.options.
timesteps``, ...). Metrics: every logged step (``loss``, ``lr``, ``images_per_s``), every epoch
(``mean_loss``) and every evaluation (``eval/<name>``), each at its optimizer step. Artifacts, when
the run ends: the sample grids (``samples.png``, ``samples/``), ``loss.png``, ``forward.png``,
``config.json`` and ``eval.json``. Tags: ``ddpmkit.run_dir`` (the run directory's absolute path) and
the ddpmkit version. A resumed run continues the same MLflow run (found by its ``ddpmkit.run_dir``
tag); MLflow keeps history, so steps logged again after the checkpoint appear twice there.

``tracking_uri``: default MLflow's own (``$MLFLOW_TRACKING_URI``, else ``./mlruns``); an
``http://host:port`` server, ``sqlite:///file.db`` or ``file:DIR`` store. Needs
``pip install 'ddpmkit[mlflow]'``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import attrs

import ddpmkit

ARTIFACTS = ("samples.png", "loss.png", "forward.png", "config.json", "eval.json")


@attrs.define
class MLflowConfig:
    """Options of ``mlflow``.

    tracking_uri: the tracking store or server. Default: MLflow's default (``$MLFLOW_TRACKING_URI``
        or ``./mlruns``).
    experiment: the experiment runs go to (created when missing). Default ``ddpmkit``.
    run_name: the MLflow run's name. Default: the run directory's name.
    parent_run_id: log as a nested run under this MLflow run. Default none.
    parent_tag: ``KEY=VALUE``: log as a nested run under the experiment's run with this tag, made
        (named VALUE, with the tag) if there is none; ``ddpmkit sweep`` nests its trials under
        ``ddpmkit.study=STUDY``. Default none.
    parent_metric: an evaluation result that the run's final evaluation also logs to the parent run,
        as ``trial/NAME`` at step ``parent_step`` (a sweep: the objective, at the trial's number).
        Default none.
    parent_step: see ``parent_metric``. Default 0.
    """

    tracking_uri: str | None = None
    experiment: str = "ddpmkit"
    run_name: str | None = None
    parent_run_id: str | None = None
    parent_tag: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.matches_re(r"^[^=]+=.+$")))
    parent_metric: str | None = None
    parent_step: int = 0


def _flat(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
    return out


class MLflowLogger:
    def __init__(self, config: MLflowConfig, run_dir: Path, run_config: dict, resume_step: int | None):
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        self.pending: list = []  # metrics logged since the last flush (sent in batches)
        self.run_dir = Path(run_dir).resolve()
        self.client = MlflowClient(tracking_uri=config.tracking_uri)
        exp = self.client.get_experiment_by_name(config.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(config.experiment)
        self.parent = config.parent_run_id or (self._parent(exp_id, config.parent_tag) if config.parent_tag else None)
        self.parent_metric, self.parent_step = config.parent_metric, config.parent_step
        found = self.client.search_runs([exp_id], f"tags.`ddpmkit.run_dir` = '{self.run_dir}'", max_results=1) \
            if resume_step is not None else []
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"ddpmkit.run_dir": str(self.run_dir), "ddpmkit.version": ddpmkit.__version__}
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        run = self.client.create_run(exp_id, run_name=config.run_name or self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k[:250], v[:6000]) for k, v in sorted(_flat(run_config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100], tags=[RunTag("ddpmkit.params", "config")])

    def _parent(self, exp_id: str, tag: str) -> str:
        """The run tagged ``KEY=VALUE`` in the experiment (the first made), made now if there is none."""
        key, _, value = tag.partition("=")
        found = self.client.search_runs([exp_id], f"tags.`{key}` = '{value}'", max_results=1,
                                        order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        return self.client.create_run(exp_id, run_name=value, tags={key: value}).info.run_id

    def log(self, record: dict) -> None:
        evals = record.get("eval") or {}
        if record.get("final") and self.parent and self.parent_metric in evals:
            self.client.log_metric(self.parent, f"trial/{self.parent_metric}", float(evals[self.parent_metric]),
                                   step=self.parent_step)
        step, now, metrics = int(record.get("step", 0)), int(time.time() * 1000), self.pending
        for key, value in record.items():
            if key == "eval" and isinstance(value, dict):
                metrics += [self._Metric(f"eval/{k}", float(v), now, step) for k, v in value.items()]
            elif key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.append(self._Metric(key, float(value), now, step))

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):
            self.client.log_batch(self.run_id, metrics=pending[i:i + 1000])

    def close(self) -> None:
        self.flush()
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / "samples").is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / "samples"), "samples")
        self.client.set_terminated(self.run_id)


def mlflow_logger(config: MLflowConfig, *, run_dir, run_config, resume_step):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ddpmkit.DdpmkitError("--logger mlflow needs MLflow: pip install 'ddpmkit[mlflow]'") from None
    return MLflowLogger(config, run_dir, run_config, resume_step)


@ddpmkit.hookimpl
def register_loggers(register):
    register("mlflow", mlflow_logger, MLflowConfig, "an MLflow tracking store or server (pip install 'ddpmkit[mlflow]')")
