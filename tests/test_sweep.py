"""ddpmkit sweep: Optuna studies whose trials are ordinary run directories.

Workers are real separate processes sharing one study through SQLite or a real PostgreSQL server
(started by .ci/run; DDPMKIT_TEST_POSTGRES holds its URL). Trials are tiny (T ≈ 20, tens of steps).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

optuna = pytest.importorskip("optuna", reason="the sweep extra (optuna) is not installed")

from ddpmkit.cli import cli  # noqa: E402

TINY_SPACE = """
preset = "tiny"
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
           "--device", "cpu", "--logger", "jsonl", *args]
    if storage:
        cmd += ["--storage", storage]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def sweep_here(tmp_path, space_file, *args) -> tuple[str, str]:
    """A worker in this process (its trials fork from multiprocessing's fork server): (stdout, stderr)."""
    r = CliRunner().invoke(cli, ["sweep", "--space", str(space_file), "--runs-dir", str(tmp_path / "runs"),
                                 "--device", "cpu", "--logger", "jsonl", *args])
    assert r.exit_code == 0, r.output
    return r.stdout, r.stderr


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
    every trial complete, both workers ran trials, the [[enqueue]] trial first; each trial an ordinary run
    directory whose configuration and score are the study's."""
    sp = space(tmp_path, 'max_steps = 4\neval_samples = 8\nlr = {log_uniform = [1e-4, 1e-2]}\n'
                         'schedule = ["linear", "cosine"]\n"schedule.timesteps" = {int = [10, 30]}\n'
                         '[[enqueue]]\nlr = 2e-3\nschedule = "linear"\n"schedule.timesteps" = 20\n')
    args = ["--metric", "digit-score", "--trials", "4", "--set", f"metric.cache_dir={digit_cache}", "--study", "shared"]
    procs = [worker(tmp_path, sp, *args, "--seed", str(k), storage=storage) for k in range(2)]
    outs = [finish(p) for p in procs]
    url = storage or f"sqlite:///{tmp_path / 'runs' / 'shared' / 'optuna.db'}"
    trials = trials_of(url, "shared")
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert trials[0].params == {"lr": 2e-3, "schedule": "linear", "schedule.timesteps": 20}  # [[enqueue]]: once
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
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


@pytest.mark.slow
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
    # the report of a study: its trials table (every value as in sweep.json), its plots, its best trials
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "runs" / "shared"), "--out", str(tmp_path / "s.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "s.html").read_text()
    for t in info["trials"]:
        assert f'data-key="study.{t["number"]}.value" data-value="{t["value"]!r}"' in page
    assert "Optimisation history" in page and "Parameter importances" in page and f"{best.number} (best)" in page
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
    ('process = ["vp", "flow"]\n"process.flow.tme" = ["uniform"]', "tme"),
    ('process = ["vp", "flow"]\n"process.flwo.time" = ["uniform"]', "flwo"),
    ('process = ["vp", "flow"]\n"process.flow.time" = ["uniform", "cubic"]', "cubic"),
    ('lr = [1e-3, 2e-3]\n"metric.kid.subsets" = [2, 3]', "KIND.COMPONENT.OPTION needs a kind chosen per run"),
    ('lr = [1e-3, 2e-3]\n[[enqueue]]\nlr = 5e-3', "[[enqueue]] #1: lr = 0.005 is outside [0.001, 0.002]"),
    ('lr = [1e-3, 2e-3]\n[[enqueue]]\nbatch_size = 8', "[[enqueue]] #1 sets 'batch_size', which is not searched"),
])
def test_a_bad_space_is_one_line_and_exit_2(tmp_path, body, says):
    sp = space(tmp_path, body + "\n")
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "digit-score", "--runs-dir",
                                 str(tmp_path / "runs")])
    assert r.exit_code == 2, r.output
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_a_sweep_searches_over_the_process_and_each_process_s_own_options(tmp_path, digit_cache):
    """process = [vp, flow, edm] with options that only one process has (process.COMPONENT.OPTION): each
    trial trains its process with only its own options, through a sampler that serves all three."""
    sp = space(tmp_path, 'max_steps = 3\neval_samples = 8\nclip_sample = false\nsampler = "heun"\n'
                         '"sampler.steps" = 2\nprocess = ["vp", "flow", "edm"]\n'
                         '"process.flow.time" = ["uniform", "logit-normal"]\n"process.edm.p_mean" = {uniform = [-1.5, -0.9]}\n'
                         '[[enqueue]]\nprocess = "vp"\n[[enqueue]]\nprocess = "flow"\n"process.flow.time" = "logit-normal"\n'
                         '[[enqueue]]\nprocess = "edm"\n"process.edm.p_mean" = -1.0\n')
    sweep_here(tmp_path, sp, "--metric", "digit-score", "--trials", "3", "--set", f"metric.cache_dir={digit_cache}",
               "--study", "proc")
    trials = trials_of(f"sqlite:///{tmp_path / 'runs' / 'proc' / 'optuna.db'}", "proc")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    seen = {}
    for t in trials:
        config = json.loads((Path(t.user_attrs["run_dir"]) / "config.json").read_text())["components"]
        seen[config["process"]["name"]] = config["process"]["options"]
        assert config["sampler"]["name"] == "heun"
    assert set(seen) == {"vp", "flow", "edm"} and seen["vp"] == {}, seen
    assert seen["flow"]["time"] == "logit-normal" and "p_mean" not in seen["flow"]
    assert seen["edm"]["p_mean"] == -1.0 and "time" not in seen["edm"]


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


def test_without_optuna_the_sweep_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    sp = space(tmp_path, 'lr = {log_uniform = [1e-4, 1e-2]}\n')
    r = CliRunner().invoke(cli, ["sweep", "--space", str(sp), "--metric", "digit-score"])
    assert r.exit_code == 2 and r.stderr.strip() == "Error: ddpmkit sweep needs Optuna: pip install 'ddpmkit[sweep]'"
