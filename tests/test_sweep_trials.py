"""ddpmkit sweep, one worker at a time: a NaN trial fails and the sweep goes on, a poor trial is pruned, a
killed worker's trial resumes from its checkpoint, a metric result the trials never report stops the sweep.
(The two-worker tests and bad input: test_sweep.py.)"""

from __future__ import annotations

import json
import signal
import time

import pytest
from click.testing import CliRunner

optuna = pytest.importorskip("optuna", reason="the sweep extra (optuna) is not installed")

from test_sweep import space, sweep_here, trials_of, worker  # noqa: E402

from ddpmkit.cli import cli  # noqa: E402


# --------------------------------------------------------------------------
# Pruning, failures, resume
# --------------------------------------------------------------------------
def test_a_failed_trial_does_not_stop_the_sweep_and_a_poor_one_is_pruned(tmp_path):
    """Enqueued trials: a good one (T=20), one whose loss becomes NaN (lr 1e6), one whose bound is far worse
    (T=3: nll ≈ 47 bits/dim against ≈ 11). The NaN trial FAILS and the sweep goes on; the T=3 trial is
    PRUNED at its first evaluation, its run stopped with a checkpoint, and its directory says so."""
    sp = space(tmp_path, 'max_steps = 40\neval_samples = 8\neval_every = 2\n'
                         '"schedule.timesteps" = [20, 3]\nlr = [1e-3, 1e6]\n', name="prune")
    url = f"sqlite:///{tmp_path / 'runs' / 'prune' / 'optuna.db'}"
    (tmp_path / "runs" / "prune").mkdir(parents=True)
    study = optuna.create_study(study_name="prune", storage=url, direction="minimize")
    for params in ({"schedule.timesteps": 20, "lr": 1e-3}, {"schedule.timesteps": 20, "lr": 1e6},
                   {"schedule.timesteps": 3, "lr": 1e-3}):
        study.enqueue_trial(params)
    out, err = sweep_here(tmp_path, sp, "--metric", "nll", "--trials", "3", "--prune-after", "1")
    states = [t.state.name for t in trials_of(url, "prune")]
    assert states == ["COMPLETE", "FAIL", "PRUNED"], err
    failed = json.loads((tmp_path / "runs" / "prune" / "trial-0001" / "trial.json").read_text())
    assert failed["state"] == "failed" and "nan" in failed["note"]
    pruned_dir = tmp_path / "runs" / "prune" / "trial-0002"
    pruned = json.loads((pruned_dir / "trial.json").read_text())
    assert pruned["state"] == "pruned" and pruned["pruned_at_step"] == 4, pruned
    steps = [json.loads(line)["step"] for line in (pruned_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 40 and list((pruned_dir / "checkpoints").iterdir())  # stopped early, checkpointed
    assert "trial 2: pruned at step 4" in err
    r = CliRunner().invoke(cli, ["sweep", "--show", "--study", "prune", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "1 complete, 1 fail, 1 pruned" in r.output, r.output
    # The completed trial's last evaluation is marked final: its value is the trial's, never a pruning point.
    from ddpmkit.sweep.results import _evaluations

    log = tmp_path / "runs" / "prune" / "trial-0000" / "metrics.jsonl"
    evals = [json.loads(x) for x in log.read_text().splitlines() if '"eval"' in x]
    assert [(e["step"], e.get("final", False)) for e in evals] == [(4 * k, False) for k in range(1, 10)] + [(40, True)]
    assert _evaluations(log, "nll_bpd") == [(e["step"], e["eval"]["nll_bpd"]) for e in evals[:-1]]
    assert trials_of(url, "prune")[0].value == pytest.approx(evals[-1]["eval"]["nll_bpd"])


def test_a_killed_worker_s_trial_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL the worker mid-trial: its run gets SIGTERM from the kernel and checkpoints. A new worker finds
    the trial stale (no heartbeat), marks it FAILED and runs its parameters again as a new trial that
    resumes from a copy of the stopped run directory: the steps before the kill are not trained twice."""
    sp = space(tmp_path, 'max_steps = 60\ncheckpoint_every = 5\neval_samples = 4\nlog_every = 1\n'
                         'lr = [2e-3, 1e-3]\n"schedule.timesteps" = 20\n', name="resume")
    args = ["--metric", "nll", "--trials", "1", "--heartbeat", "1"]
    proc = worker(tmp_path, sp, *args)
    run0 = tmp_path / "runs" / "resume" / "trial-0000"
    deadline = time.time() + 120
    while time.time() < deadline and not (run0 / "checkpoints").is_dir() or \
            len(list((run0 / "checkpoints").glob("step-*.safetensors"))) < 2:
        time.sleep(0.1)
        assert time.time() < deadline, "the trial never checkpointed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 60  # the orphaned run checkpoints and exits on its own (it watches its worker)
    while time.time() < deadline and (run0 / ".ddpmkit.lock").exists():
        time.sleep(0.1)
    assert not (run0 / ".ddpmkit.lock").exists(), "the trial's run outlived its worker"
    killed_at = max(int(p.stem.split("-")[1]) for p in (run0 / "checkpoints").glob("step-*.safetensors"))
    assert 0 < killed_at < 60
    time.sleep(2.5)  # two heartbeats: the trial is stale
    out, err = sweep_here(tmp_path, sp, *args)
    url = f"sqlite:///{tmp_path / 'runs' / 'resume' / 'optuna.db'}"
    trials = trials_of(url, "resume")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["ddpmkit.retry_of"] == 0
    run1 = tmp_path / "runs" / "resume" / "trial-0001"
    record = json.loads((run1 / "trial.json").read_text())
    assert record["resumed_from"] == str(run0) and "resumes trial 0" in err
    log = (tmp_path / "runs" / "resume" / "logs" / "trial-0001.log").read_text()
    assert "Resumed and finished" in log
    steps = [json.loads(line)["step"] for line in (run1 / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 61)), steps[:5]  # the copied steps, then the rest: each step once
    assert (run1 / "model.safetensors").exists()


def test_a_missing_metric_result_stops_the_sweep(tmp_path, monkeypatch):
    """A metric without ``directions`` needs --objective; one its trials never report stops the sweep (exit 2)
    after the first trial, which is marked failed."""
    sp = space(tmp_path, 'max_steps = 2\neval_samples = 4\n"schedule.timesteps" = {int = [10, 12]}\n', name="miss")
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "nll", "--objective", "nll_bits",
                                 "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "has no result 'nll_bits'" in r.stderr
    from ddpmkit_plugins.metrics import nll

    monkeypatch.delattr(nll.NLL, "directions")  # as a third-party metric that does not declare its results
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "nll", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "give --objective KEY and --direction" in r.stderr
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "nll", "--objective", "nll_bits",
                                 "--direction", "minimize", "--runs-dir", str(tmp_path / "runs"), "--trials", "3",
                                 "--logger", "jsonl"])
    assert r.exit_code == 2, r.output
    assert "metric 'nll' gave no 'nll_bits'" in r.stderr and "nll_bpd" in r.stderr
    trials = trials_of(f"sqlite:///{tmp_path / 'runs' / 'miss' / 'optuna.db'}", "miss")
    assert [t.state.name for t in trials] == ["FAIL"]
