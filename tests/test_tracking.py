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
    args = [a for a in tiny_args if a not in ("--max-steps", "3")]
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
