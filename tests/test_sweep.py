"""ddpmkit sweep: Optuna studies whose trials are ordinary run directories.

Workers are real separate processes sharing one study through SQLite or a real PostgreSQL server
(started by .ci/run; DDPMKIT_TEST_POSTGRES holds its URL). Trials are tiny (T ≈ 20, tens of steps).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

optuna = pytest.importorskip("optuna", reason="the sweep extra (optuna) is not installed")

from ddpmkit.cli import cli  # noqa: E402

TINY_SPACE = """
epochs = 1000
batch_size = 16
num_samples = 2
"dataset.limit" = 32
"dataset.resolution" = 16
"predictor.block_out_channels" = "8,16"
"predictor.norm_num_groups" = 4
"predictor.layers_per_block" = 1
"predictor.attention_resolutions" = "8"
"""


def space(tmp_path: Path, body: str, name: str = "space") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY_SPACE + body)
    return path


def worker(tmp_path, space_file, *args, storage=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ddpmkit", "sweep", "--space", str(space_file), "--runs-dir", str(tmp_path / "runs"),
           "--device", "cpu", *args]
    if storage:
        cmd += ["--storage", storage]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def trials_of(storage: str, study: str):
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


# --------------------------------------------------------------------------
# Two workers, one study
# --------------------------------------------------------------------------
def two_workers_share_a_study(tmp_path, storage: str | None, digit_cache):
    """Two `ddpmkit sweep` processes started together on one storage: 4 trials in all, each number once,
    every trial complete, both workers ran trials, each trial an ordinary run directory."""
    sp = space(tmp_path, 'max_steps = 4\neval_samples = 8\nlr = {log_uniform = [1e-4, 1e-2]}\n'
                         'schedule = ["linear", "cosine"]\n"schedule.timesteps" = {int = [10, 30]}\n')
    args = ["--metric", "digit-score", "--trials", "4", "--set", f"metric.cache_dir={digit_cache}", "--study", "shared"]
    procs = [worker(tmp_path, sp, *args, "--seed", str(k), storage=storage) for k in range(2)]
    outs = [finish(p) for p in procs]
    url = storage or f"sqlite:///{tmp_path / 'runs' / 'shared' / 'optuna.db'}"
    trials = trials_of(url, "shared")
    numbers = [t.number for t in trials]
    assert sorted(numbers) == [0, 1, 2, 3], numbers
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    ran = [int(out.split("This worker ran ")[1].split()[0]) for out, _ in outs]
    assert sum(ran) == 4 and min(ran) >= 1, ran  # both workers took trials from the one study
    started = [{int(n) for n in re.findall(r"^trial (\d+): lr=", err, re.M)} for _, err in outs]
    assert started[0].isdisjoint(started[1]) and started[0] | started[1] == {0, 1, 2, 3}, started
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == (tmp_path / "runs" / "shared" / f"trial-{t.number:04d}").resolve()
        record = json.loads((run_dir / "trial.json").read_text())
        assert record["state"] == "complete" and record["value"] == pytest.approx(t.value)
        assert json.loads((run_dir / "eval.json").read_text())["results"]["digit_is"] == pytest.approx(t.value)
        config = json.loads((run_dir / "config.json").read_text())
        assert config["run"]["lr"] == pytest.approx(t.params["lr"])
        assert config["components"]["schedule"]["name"] == t.params["schedule"]
        assert config["components"]["schedule"]["options"]["timesteps"] == t.params["schedule.timesteps"]
    return trials


def test_two_sqlite_workers_share_one_study(tmp_path, digit_cache):
    trials = two_workers_share_a_study(tmp_path, None, digit_cache)
    # --show: the table, sweep.json with the best trial, the two plots
    r = CliRunner().invoke(cli, ["sweep", "--show", "--study", "shared", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    best = max(trials, key=lambda t: t.value)
    info = json.loads((tmp_path / "runs" / "shared" / "sweep.json").read_text())
    assert info["best"]["number"] == best.number and info["best"]["value"] == pytest.approx(best.value)
    assert info["metric"] == "digit-score" and info["objective"] == "digit_is"
    assert r.output.index(f"{best.value:.6g}") < min(r.output.index(f"{t.value:.6g}") for t in trials if t is not best)
    from PIL import Image

    for name in ("history.png", "importance.png"):
        img = Image.open(tmp_path / "runs" / "shared" / name)
        assert img.size[0] > 400 and len(set(img.convert("L").getdata())) > 10
    # a trial directory is an ordinary run directory
    r = CliRunner().invoke(cli, ["sample", str(tmp_path / "runs" / "shared" / "trial-0001"), "-n", "2",
                                 "--out", str(tmp_path / "s.png"), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_two_postgresql_workers_share_one_study(tmp_path, digit_cache):
    url = os.environ.get("DDPMKIT_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: .ci/run starts one (Debian's postgresql) and sets DDPMKIT_TEST_POSTGRES")
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver of the test extra) is not installed")
    name = "shared"
    with __import__("contextlib").suppress(KeyError):  # a study left by an earlier run of this test
        optuna.delete_study(study_name=name, storage=url)
    two_workers_share_a_study(tmp_path, url, digit_cache)
    optuna.delete_study(study_name=name, storage=url)


# --------------------------------------------------------------------------
# Pruning, failures, resume
# --------------------------------------------------------------------------
def test_a_failed_trial_does_not_stop_the_sweep_and_a_poor_one_is_pruned(tmp_path):
    """Enqueued trials: a good one (T=20), one whose loss becomes NaN (lr 1e6), one whose bound is far worse
    (T=3: nll ≈ 47 bits/dim against ≈ 11). The NaN trial FAILS and the sweep goes on; the T=3 trial is
    PRUNED at its first evaluation, its run stopped with a checkpoint, and its directory says so."""
    sp = space(tmp_path, 'max_steps = 100\neval_samples = 8\neval_every = 4\n'
                         '"schedule.timesteps" = [20, 3]\nlr = [1e-3, 1e6]\n', name="prune")
    url = f"sqlite:///{tmp_path / 'runs' / 'prune' / 'optuna.db'}"
    (tmp_path / "runs" / "prune").mkdir(parents=True)
    study = optuna.create_study(study_name="prune", storage=url, direction="minimize")
    for params in ({"schedule.timesteps": 20, "lr": 1e-3}, {"schedule.timesteps": 20, "lr": 1e6},
                   {"schedule.timesteps": 3, "lr": 1e-3}):
        study.enqueue_trial(params)
    out, err = finish(worker(tmp_path, sp, "--metric", "nll", "--trials", "3", "--prune-after", "1"))
    states = [t.state.name for t in trials_of(url, "prune")]
    assert states == ["COMPLETE", "FAIL", "PRUNED"], err
    failed = json.loads((tmp_path / "runs" / "prune" / "trial-0001" / "trial.json").read_text())
    assert failed["state"] == "failed" and "nan" in failed["note"]
    pruned_dir = tmp_path / "runs" / "prune" / "trial-0002"
    pruned = json.loads((pruned_dir / "trial.json").read_text())
    assert pruned["state"] == "pruned" and pruned["pruned_at_step"] == 8, pruned
    steps = [json.loads(line)["step"] for line in (pruned_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 100 and list((pruned_dir / "checkpoints").iterdir())  # stopped early, checkpointed
    assert "trial 2: pruned at step 8" in err
    r = CliRunner().invoke(cli, ["sweep", "--show", "--study", "prune", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "1 complete, 1 fail, 1 pruned" in r.output, r.output


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
    deadline = time.time() + 60  # the orphaned run checkpoints and exits on its own (PR_SET_PDEATHSIG)
    while time.time() < deadline and (run0 / ".ddpmkit.lock").exists():
        time.sleep(0.1)
    assert not (run0 / ".ddpmkit.lock").exists(), "the trial's run outlived its worker"
    killed_at = max(int(p.stem.split("-")[1]) for p in (run0 / "checkpoints").glob("step-*.safetensors"))
    assert 0 < killed_at < 60
    time.sleep(2.5)  # two heartbeats: the trial is stale
    out, err = finish(worker(tmp_path, sp, *args))
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


# --------------------------------------------------------------------------
# Bad input: one line, exit 2
# --------------------------------------------------------------------------
@pytest.mark.parametrize("body, says", [
    ('lrr = {log_uniform = [1e-4, 1e-2]}', "unknown parameter 'lrr'; did you mean 'lr'?"),
    ('"schedul.timesteps" = {int = [10, 20]}', "unknown parameter 'schedul.timesteps'"),
    ('"schedule.timestep" = {int = [10, 20]}', "unknown option 'timestep' for schedule 'linear'"),
    ('lr = {log_uniform = [0, 1e-2]}', "log_uniform needs [low, high]"),
    ('lr = {uniform = [1e-2, 1e-4]}', "low < high"),
    ('"schedule.timesteps" = {int = [10.5, 20]}', "int needs [low, high], two integers"),
    ('lr = {gaussian = [1, 2]}', "is malformed"),
    ('schedule = ["linear", "cosinus"]', "cosinus"),
    ('lr = 1e-3', "nothing to search"),
])
def test_a_bad_space_is_one_line_and_exit_2(tmp_path, body, says):
    sp = space(tmp_path, body + "\n")
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "digit-score", "--runs-dir",
                                 str(tmp_path / "runs")])
    assert r.exit_code == 2, r.output
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_other_bad_input_is_one_line_and_exit_2(tmp_path):
    sp = space(tmp_path, 'lr = {log_uniform = [1e-4, 1e-2]}\n')
    base = ["sweep", "--space", str(sp), "--runs-dir", str(tmp_path / "runs")]
    cases = [
        (["--metric", "fdi"], "unknown metric 'fdi'"),
        (["--metric", "digit-score", "--objective", "digit_iz"], "has no result 'digit_iz'; it gives: digit_is"),
        (["--metric", "digit-score", "--storage", "postgresql+psycopg://nobody@127.0.0.1:9/none"],
         "cannot open the study storage postgresql+psycopg://nobody@127.0.0.1:9/none"),
        (["--metric", "digit-score", "--storage", "nosuchdb://x"], "cannot open the study storage"),
        (["--metric", "digit-score", "--trials", "0"], "--trials must be >= 1"),
    ]
    for args, says in cases:
        r = CliRunner().invoke(cli, base + args)
        assert r.exit_code == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    # --show: a study that does not exist; a study with no completed trial; another metric than the study's
    r = CliRunner().invoke(cli, ["sweep", "--show", "--study", "nope", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "no study 'nope'" in r.stderr
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(study_name="empty", storage=url)
    study.set_user_attr("metric", "digit-score")
    study.set_user_attr("objective", "digit_is")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    r = CliRunner().invoke(cli, ["sweep", "--show", "--study", "empty", "--storage", url])
    assert r.exit_code == 2 and "no completed trial with a value of digit_is" in r.stderr, r.stderr
    r = CliRunner().invoke(cli, ["sweep", "--show", "--study", "empty", "--storage", url, "--metric", "fid"])
    assert r.exit_code == 2 and "scores digit-score:digit_is, not fid" in r.stderr


def test_a_missing_metric_result_stops_the_sweep(tmp_path, monkeypatch):
    """A metric without ``directions`` needs --objective; one its trials never report stops the sweep (exit 2)
    after the first trial, which is marked failed."""
    sp = space(tmp_path, 'max_steps = 2\neval_samples = 4\n"schedule.timesteps" = {int = [10, 12]}\n', name="miss")
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "nll", "--objective", "nll_bits",
                                 "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "has no result 'nll_bits'" in r.stderr
    from ddpmkit_plugins import nll

    monkeypatch.delattr(nll.NLL, "directions")  # as a third-party metric that does not declare its results
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "nll", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "give --objective KEY and --direction" in r.stderr
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "nll", "--objective", "nll_bits",
                                 "--direction", "minimize", "--runs-dir", str(tmp_path / "runs"), "--trials", "3"])
    assert r.exit_code == 2, r.output
    assert "metric 'nll' gave no 'nll_bits'" in r.stderr and "nll_bpd" in r.stderr
    trials = trials_of(f"sqlite:///{tmp_path / 'runs' / 'miss' / 'optuna.db'}", "miss")
    assert [t.state.name for t in trials] == ["FAIL"]


def test_without_optuna_the_sweep_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    sp = space(tmp_path, 'lr = {log_uniform = [1e-4, 1e-2]}\n')
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "digit-score"])
    assert r.exit_code == 2 and r.stderr.strip() == "Error: ddpmkit sweep needs Optuna: pip install 'ddpmkit[sweep]'"
