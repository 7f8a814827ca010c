"""The run directory is the user's data: never clobbered, locked while a run writes it, a checkpoint on
every stop, input that is never silently wrong, files a team can share, caches that cannot lie."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import small_run
from PIL import Image
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.cli import cli

TINY = small_run(max_steps=None, samples=2)


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def cmd(*args):
    return [sys.executable, "-m", "ddpmkit", *args]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("rundir") / "run"
    r = CliRunner().invoke(cli, ["run", *TINY, "--max-steps", "6", "--checkpoint-every", "2", "--out", str(run)])
    assert r.exit_code == 0, r.output
    return run


# -- 1. protect the run directory ----------------------------------------------------------------
def test_a_finished_run_is_not_overwritten(finished):
    before = {p.name: md5(p) for p in (finished, finished / "checkpoints") for p in p.iterdir() if p.is_file()}
    for args in (["--max-steps", "4"], ["--max-steps", "2", "--metric", "digit-scroe"]):
        r = invoke("run", *TINY, *args, "--out", str(finished))
        assert r.exit_code == 2
        assert r.stderr.strip().splitlines()[-1].startswith(f"Error: run directory '{finished}' is not empty") or \
            "unknown metric 'digit-scroe'" in r.stderr
    after = {p.name: md5(p) for p in (finished, finished / "checkpoints") for p in p.iterdir() if p.is_file()}
    assert after == before  # model, config, checkpoints and logs untouched


def test_a_file_is_not_a_run_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ddpmkit.DdpmkitError, match="f' is a file, not a run directory; choose another --out"):
        ddpmkit.train(ddpmkit.preset_config("laptop"), tmp_path / "f", device="cpu", progress=False)
    assert (tmp_path / "f").read_text() == "x"


def test_a_typo_writes_nothing(tmp_path, finished):
    config = md5(finished / "config.json")
    r = invoke("run", *TINY, "--metric", "digit-scroe", "--out", str(tmp_path / "new"))
    assert r.exit_code == 2 and "unknown metric 'digit-scroe'" in r.stderr
    assert not (tmp_path / "new").exists()
    assert md5(finished / "config.json") == config


def test_overwrite_removes_the_earlier_run(tmp_path):
    run = tmp_path / "run"
    assert invoke("run", *TINY, "--max-steps", "6", "--checkpoint-every", "2", "--out", str(run)).exit_code == 0
    (run / "notes.txt").write_text("mine")
    r = invoke("run", *TINY, "--max-steps", "3", "--checkpoint-every", "1", "--keep", "5", "--overwrite",
               "--out", str(run))
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step-{i:08d}.safetensors" for i in (1, 2, 3)]  # not [.., 4:A, 6:A]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are removed
    r = invoke("run", "--resume", str(run), "--overwrite")
    assert r.exit_code == 2 and "drop --preset/--config/--out/--overwrite" in r.stderr


def test_a_second_process_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(cmd("run", *TINY, "--max-steps", "200", "--checkpoint-every", "5", "--out", str(run)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step-*.safetensors")):
        time.sleep(0.05)
    lock = json.loads((run / ".ddpmkit.lock").read_text())
    assert lock["pid"] == first.pid
    second = invoke("run", *TINY, "--max-steps", "2", "--out", str(run))
    assert second.exit_code == 2
    assert second.stderr.strip().startswith(f"Error: run directory '{run}' is in use by process {first.pid} on ")
    resume = invoke("run", "--resume", str(run), "--device", "cpu")
    assert resume.exit_code == 2 and "is in use by process" in resume.stderr
    # while it writes, sample reads the newest complete checkpoint
    r = invoke("sample", str(run), "-n", "1", "--out", str(tmp_path / "mid.png"), "--no-progress")
    assert r.exit_code == 0, r.output
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (run / ".ddpmkit.lock").exists()  # a SIGKILL leaves the file behind ...
    r = invoke("run", "--resume", str(run), "--max-steps", "12", "--no-progress", "--device", "cpu")
    assert r.exit_code == 0, r.output  # ... and the next run takes it over
    assert f"was locked by process {first.pid}" in r.stderr and "taking the lock over" in r.stderr
    assert not (run / ".ddpmkit.lock").exists()


# -- 2. a checkpoint on every stop ----------------------------------------------------------------
SIGNAL_RUN = [*TINY, "--set", "dataset.limit=256", "--max-steps", "40", "--epochs", "3", "--log-every", "1",
              "--set", "predictor.dropout=0.1", "--seed", "4"]  # 16 steps an epoch; per-epoch checkpoints


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref = tmp_path_factory.mktemp("signals") / "ref"
    assert subprocess.run(cmd("run", *SIGNAL_RUN, "--out", str(ref)), capture_output=True).returncode == 0
    return load_file(str(ref / "model.safetensors"))


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_and_resume_is_bitwise(tmp_path, uninterrupted, sig, code):
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd("run", *SIGNAL_RUN, "--out", str(cut)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline, logged = time.time() + 120, []
    while time.time() < deadline and not [s for s in logged if s >= 20]:
        time.sleep(0.02)
        if (cut / "metrics.jsonl").exists():
            logged = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()
                      if line.endswith("}") and '"loss"' in line]
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = err.strip().splitlines()[-1]
    saved = sorted((cut / "checkpoints").glob("step-*.safetensors"))[-1]
    step = int(saved.name[5:13])
    name = signal.Signals(sig).name
    assert line == (f"{name}: stopped at step {step} of 40; checkpoint {saved}. "
                    f"Continue with: ddpmkit run --resume {cut}")
    assert 20 <= step < 40 and step % 16 != 0  # mid-epoch, not an epoch checkpoint
    assert step <= max(logged) + 2  # at most the step in flight is lost (logs lag a step behind the poll)
    r = invoke("run", "--resume", str(cut), "--no-progress", "--device", "cpu")
    assert r.exit_code == 0, r.output
    resumed = load_file(str(cut / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


# -- 3. input that is never silently wrong --------------------------------------------------------
def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "png16"
    folder.mkdir()
    gradient = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(gradient).save(folder / "g.png")
    assert Image.open(folder / "g.png").mode.startswith("I")
    ds = ddpmkit.build("dataset", "image-folder", {"path": str(folder), "channels": 1, "resolution": 32})
    x = ds[0][0]
    expected = torch.from_numpy(gradient.astype(np.float64) / 65535 * 2 - 1).float()
    torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)  # Pillow's "L" made 99% of it white
    floats = tmp_path / "tif"
    floats.mkdir()
    Image.fromarray(np.full((8, 8), 3.5, np.float32), mode="F").save(floats / "f.tif")
    with pytest.raises(ddpmkit.DdpmkitError, match="f.tif: a 32-bit float image with values in \\[3.5, 3.5\\]"):
        ddpmkit.build("dataset", "image-folder", {"path": str(floats), "channels": 1, "resolution": 8})[0]


@pytest.mark.parametrize("value", ["2", "-1", "nan", "1"])
def test_ema_out_of_range_is_one_line(tmp_path, value):
    r = invoke("run", *TINY, "--ema", value, "--out", str(tmp_path / "r"))
    assert r.exit_code == 2
    assert r.stderr.strip().startswith("Error: invalid option: ema_decay must lie in (0, 1)")
    assert not (tmp_path / "r").exists()


def test_no_file_gets_nan_in_its_json(tmp_path):
    with pytest.raises(ValueError):
        ddpmkit.sdk.files.write_json(tmp_path / "x.json", {"v": math.nan})
    assert not (tmp_path / "x.json").exists()


def test_resume_survives_a_torn_log_line_and_a_damaged_config(tmp_path):
    run = tmp_path / "run"
    assert invoke("run", *TINY, "--max-steps", "4", "--checkpoint-every", "2", "--log-every", "1",
                  "--out", str(run)).exit_code == 0
    (run / "config.json").write_text((run / "config.json").read_text()[:40])  # what a full disk leaves
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.1')  # what a kill leaves
    r = invoke("run", "--resume", str(run), "--max-steps", "6", "--no-progress", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "metrics.jsonl: line 6 is torn (an interrupted write); dropped" in r.stderr
    json.loads((run / "config.json").read_text())  # restored from the checkpoint's own configuration
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_missing_data_creates_no_folders(tmp_path):
    target = tmp_path / "nonexistent"
    r = invoke("run", "--preset", "mnist", "--data-root", str(target), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "mnist train files not found" in r.stderr
    assert not target.exists() and not (tmp_path / "r").exists()


# -- 4. files a team can share --------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_files_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        assert invoke("run", *TINY, "--max-steps", "2", "--out", str(run)).exit_code == 0
        files = [run / n for n in ("model.safetensors", "config.json", "metrics.jsonl", "samples.png", "loss.png")]
        files += list((run / "checkpoints").iterdir())
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {oct(mode)}, modes
        r = invoke("export", str(run), str(tmp_path / "exported"))
        assert r.exit_code == 0 and (tmp_path / "exported").stat().st_mode & 0o777 == mode | 0o111
    finally:
        os.umask(old)


# -- 5. caches and exports that cannot lie ---------------------------------------------------------
def _folder(path, seed, n=6):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(path / f"{i}.png")


def test_fid_statistics_follow_the_reference_folder(tmp_path, monkeypatch):
    """The cached real statistics are those of the folder as it is now: keyed on its resolved path and
    its contents, not on `data_root` as typed (the cache's own file is compared with a fresh computation)."""
    import attrs

    torch.manual_seed(0)  # a random-weight Inception, built once
    metric = ddpmkit.build("metric", "fid", {"dataset": "image-folder", "reference_images": 6, "pretrained": False,
                                             "cache_dir": str(tmp_path / "cache"), "batch_size": 6}, device="cpu")

    def mu(data_root, cache_dir=None):
        metric.config = attrs.evolve(metric.config, data_root=data_root,
                                     cache_dir=cache_dir or str(tmp_path / "cache"))
        return torch.from_numpy(metric.reference(16)[0])

    one, two = tmp_path / "a", tmp_path / "b"
    _folder(one / "ref", 1)
    _folder(two / "ref", 2)
    monkeypatch.chdir(one)
    first = mu("ref")
    monkeypatch.chdir(two)
    cached, fresh = mu("ref"), mu("ref", str(tmp_path / "fresh-1"))
    assert torch.equal(cached, fresh) and not torch.allclose(cached, first)  # not a's statistics
    _folder(two / "ref", 3)  # replace the images
    cached, fresh = mu("ref"), mu("ref", str(tmp_path / "fresh-2"))
    assert torch.equal(cached, fresh)
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_export_prints_the_call_that_reproduces_sampling(tmp_path, finished):
    r = invoke("export", str(finished), str(tmp_path / "out"))
    assert r.exit_code == 0
    assert "num_inference_steps=20)" in r.stdout.splitlines()[-1]


SLOW_RUN = """
import sys, time, torch, ddpmkit
from ddpmkit.cli import main

class Slow:
    @staticmethod
    @ddpmkit.hookimpl
    def register_losses(register):
        def loss(p, t, reduction="mean"):
            if torch.is_grad_enabled() and p.shape[0] > 2:  # training steps (not the probe): one a second
                print("step", flush=True)
                time.sleep(1.0)
            return torch.nn.functional.mse_loss(p, t, reduction=reduction)
        register("slow", lambda: loss)

ddpmkit.register_plugin(Slow(), name="slow")
sys.argv = ["ddpmkit", *sys.argv[1:]]
main()
"""


def test_a_second_signal_stops_at_once(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RUN)
    proc = subprocess.Popen([sys.executable, str(script), "run", *TINY, "--loss", "slow", "--max-steps", "30",
                             "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "step"  # inside the first (slow) step
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # killed by the second signal, before the step ended
    assert "stopped at step" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_under_torchrun_every_rank_stops_at_the_same_step(tmp_path):
    """Only rank 0 gets the SIGTERM; the ranks agree on the step (rank 1 would otherwise train on and
    hang in its next all-reduce), rank 0 writes the one checkpoint, both say where it is."""
    import re

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "ddpmkit", "run", *TINY, "--max-steps", "80", "--checkpoint-every", "1000",
                             "--log-every", "1", "--out", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and (run / "metrics.jsonl").read_text().count('"loss"') >= 3):
        time.sleep(0.05)
    os.kill(json.loads((run / ".ddpmkit.lock").read_text())["pid"], signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    steps = re.findall(r"SIGTERM: stopped at step (\d+) of 80;", err)
    assert len(steps) == 2 and steps[0] == steps[1], err[:3000]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{int(steps[0]):08d}.safetensors"]


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata from a hash map whose order changes between maps and processes;
    write_tensors sorts it, so a model file is a pure function of its contents. Written 6 times in this
    process and once in another, with 8 metadata keys: one set of bytes, and it reads back the same."""
    from safetensors import safe_open

    from ddpmkit.sdk.files import write_tensors

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float64)}
    metadata = {f"key{k}": f"value {k} é" for k in (5, 1, 7, 3, 0, 6, 2, 4)}
    paths = [write_tensors(tmp_path / f"{i}.safetensors", tensors, metadata) for i in range(6)]
    code = ("import sys, torch; from ddpmkit.sdk.files import write_tensors; "
            "write_tensors(sys.argv[1], {'w': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(4, dtype=torch.float64)}, "
            "{f'key{k}': f'value {k} é' for k in (5, 1, 7, 3, 0, 6, 2, 4)})")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other.safetensors")], check=True)
    paths.append(tmp_path / "other.safetensors")
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == metadata
    data = paths[0].read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header) == ["__metadata__", "b", "w"] and list(header["__metadata__"]) == sorted(metadata)
    loaded = load_file(str(paths[0]))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
