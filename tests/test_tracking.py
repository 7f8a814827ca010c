"""The mlflow logger against a real `mlflow server` started on a local port: parameters, metrics and
artifacts of a tiny run read back through MLflow's client."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner
from conftest import small_run

import ddpmkit
from ddpmkit.cli import cli

mlflow = pytest.importorskip("mlflow", reason="mlflow (the test extra) is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (SQLite backend, artifacts served by the server); stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", (root / "artifacts").as_uri(), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_a_run_logged_to_an_mlflow_server(mlflow_server, tmp_path, tiny_args):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = small_run(max_steps=None)
    r = CliRunner().invoke(cli, ["run", "--out", str(run), *args, "--max-steps", "4", "--log-every", "1",
                                 "--logger", "jsonl", "--logger", "mlflow", "--lr", "0.0015",
                                 "--set", f"logger.tracking_uri={mlflow_server}", "--set", "logger.experiment=tiny"])
    assert r.exit_code == 0, r.output
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], f"tags.`ddpmkit.run_dir` = '{run.resolve()}'")
    assert len(runs) == 1
    got = runs[0]
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert got.data.params["run.lr"] == "0.0015" and got.data.params["components.schedule.name"] == "linear"
    assert got.data.params["components.schedule.options.timesteps"] == "20"
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in logged if "loss" in rec]
    history = client.get_metric_history(got.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(rec["step"], rec["loss"]) for rec in steps]
    assert len(history) == 4 and "mean_loss" in got.data.metrics and "lr" in got.data.metrics
    artifacts = {a.path for a in client.list_artifacts(got.info.run_id)}
    assert {"samples.png", "config.json", "loss.png", "forward.png"} <= artifacts
    local = client.download_artifacts(got.info.run_id, "config.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == json.loads((run / "config.json").read_text())


def test_mlflow_missing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ddpmkit.DdpmkitError, match=r"needs MLflow: pip install 'ddpmkit\[mlflow\]'"):
        ddpmkit.build("logger", "mlflow", {}, run_dir=tmp_path, run_config={}, resume_step=None)


def test_a_sweep_logs_each_trial_as_a_nested_run(mlflow_server, tmp_path):
    """ddpmkit sweep --logger mlflow: one run for the study, the trial a run nested under it (its parameters
    the trial's configuration), and the study's run holds the trial's value."""
    pytest.importorskip("optuna", reason="the sweep extra (optuna) is not installed")
    from mlflow.tracking import MlflowClient

    space = tmp_path / "nested.toml"
    space.write_text('preset = "tiny"\nepochs = 100\nmax_steps = 2\nbatch_size = 16\nnum_samples = 2\neval_samples = 4\n'
                     '"dataset.limit" = 32\n"dataset.resolution" = 16\n"predictor.block_out_channels" = "8,16"\n'
                     '"predictor.norm_num_groups" = 4\n"predictor.layers_per_block" = 1\n'
                     '"predictor.attention_resolutions" = "8"\n"schedule.timesteps" = 10\nlr = [1e-3, 2e-3]\n')
    r = CliRunner().invoke(cli, ["sweep", "--space", str(space), "--metric", "nll", "--trials", "1", "--device", "cpu",
                                 "--runs-dir", str(tmp_path / "runs"), "--logger", "mlflow",
                                 "--set", f"logger.tracking_uri={mlflow_server}", "--set", "logger.experiment=sweeps"])
    assert r.exit_code == 0, r.output
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("sweeps")
    parents = client.search_runs([exp.experiment_id], "tags.`ddpmkit.study` = 'nested'")
    assert len(parents) == 1
    parent = parents[0].info.run_id
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                                  order_by=["attributes.run_name ASC"])
    assert [c.info.run_name for c in children] == ["trial-0000"]
    sweep = json.loads((tmp_path / "runs" / "nested" / "sweep.json").read_text())
    for child, trial in zip(children, sweep["trials"]):
        assert child.info.status == "FINISHED"
        assert float(child.data.params["run.lr"]) == pytest.approx(trial["params"]["lr"])
        assert child.data.tags["ddpmkit.run_dir"] == trial["run_dir"]
    history = client.get_metric_history(parent, "trial/nll_bpd")
    assert sorted((m.step, m.value) for m in history) == [(t["number"], pytest.approx(t["value"])) for t in sweep["trials"]]
