"""Training that survives: SIGKILL + resume is bitwise identical, EMA, NaN stop, DDP, figures, export."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import small_run
from safetensors import safe_open
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.cli import cli

BASE = small_run({"dataset.limit": 256, "schedule.timesteps": 30}, max_steps=None, samples=2, seed=5, ema=0.9,
                 warmup=5, lr="1e-3")


def ddpmkit_cmd(*args):
    return [sys.executable, "-m", "ddpmkit", *args]


def tensors(path):
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    steps = ["--max-steps", "120", "--checkpoint-every", "10", "--keep", "3", "--epochs", "10",
             "--set", "predictor.dropout=0.1",  # dropout: the global RNG must be restored too
             # improved DDPM's recipe: the loss-aware timestep sampler's history (full after ~19 of the 120
             # steps, then t is importance-sampled) is training state too
             "--loss", "hybrid", "--learn-variance", "--timestep-sampler", "loss-aware",
             "--lr-decay", "cosine",  # the learning rate after a resume follows the same curve
             "--posthoc-ema", "0.05,0.10"]  # post-hoc EMA profiles are training state; snapshots every 8 steps
    ref = tmp_path / "ref"
    r = subprocess.run(ddpmkit_cmd("run", *BASE, *steps, "--out", str(ref)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(ddpmkit_cmd("run", *BASE, *steps, "--out", str(killed)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").glob("step-0000002*.safetensors")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    done = sorted(p.name for p in (killed / "checkpoints").glob("step-*.safetensors"))
    assert done and done[-1] < "step-00000120.safetensors"
    # a write interrupted by the kill leaves at most a temporary file, never a damaged checkpoint name;
    # simulate the worst case too: a leftover temp file and a newest checkpoint that is damaged
    (killed / "checkpoints" / ".step-00000099.safetensors.abc.tmp").write_bytes(b"partial")
    last = killed / "checkpoints" / done[-1]
    damaged = killed / "checkpoints" / f"step-{int(done[-1][5:13]) + 1:08d}.safetensors"
    damaged.write_bytes(last.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="is damaged; using the one before it"):
        assert ddpmkit.run.train_state.latest_checkpoint(killed / "checkpoints") == last
    damaged.unlink()
    r = subprocess.run(ddpmkit_cmd("run", "--resume", str(killed), "--no-progress", "--device", "cpu"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same(tensors(ref / "checkpoints" / "step-00000120.safetensors"),
                tensors(killed / "checkpoints" / "step-00000120.safetensors"))
    assert_same(load_file(str(ref / "model.safetensors")), load_file(str(killed / "model.safetensors")))
    snaps = sorted(p.name for p in (ref / "posthoc-ema").iterdir())
    assert len(snaps) == 30 and snaps == sorted(p.name for p in (killed / "posthoc-ema").iterdir())
    for name in snaps:  # the profiles resumed with the run (a snapshot past the last checkpoint was rewritten)
        assert_same(load_file(str(ref / "posthoc-ema" / name)), load_file(str(killed / "posthoc-ema" / name)))
    # keep the last 3; the temporary file is cleaned up
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["step-00000100.safetensors", "step-00000110.safetensors", "step-00000120.safetensors"]
    # the metrics log has each step once
    logged = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]
    assert [r["step"] for r in logged] == list(range(10, 121, 10))
    # warm-up over 5 steps, then cosine from 1e-3 down to 0 at step 120 (the lr logged is the next step's)
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 5) / 115)) for r in logged]
    assert [r["lr"] for r in logged] == pytest.approx(expected, abs=1e-12)
    assert logged[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and logged[0]["lr"] > 9.4e-4


def test_ema_weights_are_what_sampling_uses(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "20", "--out", str(run)])
    assert r.exit_code == 0, r.output
    final = tensors(run / "checkpoints" / "step-00000020.safetensors")
    sampled = load_file(str(run / "model.safetensors"))
    pipe = ddpmkit.load_checkpoint(run)
    params = [name for name, _ in pipe.model.named_parameters()]  # EMA shadow params follow this order
    ema = {f"ema.{i}": final[f"ema.{i}"] for i in range(sum(k.startswith("ema.") for k in final))}
    assert len(ema) == len(params)  # the UNet has parameters only, no buffers
    for i, name in enumerate(params):
        assert torch.equal(sampled[name], ema[f"ema.{i}"])
    assert any(not torch.equal(sampled[n], final[f"model.{n}"]) for n in params)
    assert torch.equal(pipe.model.state_dict()[params[0]], ema["ema.0"])


def test_ema_warmup_follows_diffusers_formula():
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999)
    assert ema.get_decay(1) == 0.0 and ema.get_decay(11) == pytest.approx(11 / 20)
    assert ema.get_decay(100_000) == 0.999


class NanAfter:
    """A loss that turns NaN on its 13th call: the 12th training step (the probe that checks every
    component when a run starts calls it once before training)."""

    calls = 0

    @staticmethod
    @ddpmkit.hookimpl
    def register_losses(register):
        def factory(config=None):
            def loss(p, t, reduction="mean"):
                NanAfter.calls += 1
                value = torch.nn.functional.mse_loss(p, t)
                return value * float("nan") if NanAfter.calls >= 13 else value
            return loss
        register("nan-after", factory)


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(tmp_path):
    ddpmkit.register_plugin(NanAfter(), name="nan-plugin")
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *BASE, "--loss", "nan-after", "--max-steps", "50", "--checkpoint-every", "5",
                                 "--out", str(run)])
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert line.startswith("Error: loss became nan or inf at step 12; stopped") and "step-00000010.safetensors" in line
    assert "\n" not in line
    assert not (run / "model.safetensors").exists()
    good = tensors(run / "checkpoints" / "step-00000010.safetensors")
    assert all(torch.isfinite(v.float()).all() for k, v in good.items() if k.startswith("model."))


def test_resume_errors(tmp_path):
    r = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "--resume: no checkpoint in" in r.stderr
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "5", "--out", str(run)]).exit_code == 0
    r = CliRunner().invoke(cli, ["run", "--resume", str(run), "--lr", "0.5", "--schedule", "cosine",
                                 "--set", "schedule.timesteps=31", "--batch-size", "16"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("Error: --resume: these flags differ from the run's configuration: "
                                "schedule cosine (run has linear); schedule.timesteps 31 (run has 30); "
                                "lr 0.5 (run has 0.001). Drop them to continue the run, or start a new one with --out")
    # more epochs / steps is allowed: the run continues
    r = CliRunner().invoke(cli, ["run", "--resume", str(run), "--max-steps", "8", "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (run / "checkpoints" / "step-00000008.safetensors").exists()


def test_grad_accum_clip_and_precision(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "4", "--grad-accum", "2", "--grad-clip", "0.5",
                                 "--log-every", "1", "--out", str(run)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())["run"]
    assert cfg["grad_accum"] == 2 and cfg["grad_clip"] == 0.5 and cfg["precision"] == "auto"
    r = CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "2", "--grad-accum", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not divisible by --grad-accum 3" in r.stderr
    # bf16 autocast also runs on the CPU (it pays where the processor has bf16 instructions)
    r = CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "2", "--precision", "bf16", "--out", str(tmp_path / "y")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "y" / "config.json").read_text())["run"]["precision"] == "bf16"


def test_figures_and_logs(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *BASE, "--set", "dataset.limit=64", "--epochs", "2", "--grid-every", "1",
                                 "--log-every", "1", "--out", str(run)])
    assert r.exit_code == 0, r.output
    for name in ("forward.png", "loss.png", "samples.png", "samples/epoch-0001.png", "samples/epoch-0002.png"):
        assert Image.open(run / name).format == "PNG", name
    strip = Image.open(run / "forward.png")
    assert strip.size[0] > 8 * strip.size[1]  # x_0 and 8 noise levels side by side
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["epoch"] for r in rows if "mean_loss" in r] == [1, 2]
    assert all({"loss", "lr", "images_per_s"} <= set(r) for r in rows if "loss" in r)
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard events"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 9))


def test_export_to_diffusers_pipeline(tmp_path):
    from diffusers import DDPMPipeline

    run = tmp_path / "run"
    assert CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "5", "--clip", "--out", str(run)]).exit_code == 0
    out = tmp_path / "exported"
    r = CliRunner().invoke(cli, ["export", str(run), str(out), "--format", "diffusers"])
    assert r.exit_code == 0, r.output
    pipeline = DDPMPipeline.from_pretrained(str(out))
    assert pipeline.scheduler.config.num_train_timesteps == 30 and pipeline.scheduler.config.clip_sample
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=30,
                      output_type="np").images
    ours = ddpmkit.load_checkpoint(run).sample(2, seed=3)
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == ours.shape == (2, 16, 16, 1)
    assert abs(images - ours).max() < 1e-3  # same weights, betas and noise → the same images
    r = CliRunner().invoke(cli, ["export", str(run), str(out)])
    assert r.exit_code == 2 and "is not empty" in r.stderr
    # a U-Net behind the space-to-depth stem (the laptop preset's) is no DDPMPipeline: refused, nothing written
    stem = tmp_path / "stem"
    assert CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "1", "--set", "predictor.patch_size=2",
                                    "--set", "predictor.pad=2", "--out", str(stem)]).exit_code == 0
    r = CliRunner().invoke(cli, ["export", str(stem), str(tmp_path / "stem-exported")])
    assert r.exit_code == 2 and "space-to-depth stem (patch_size=2, pad=2)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "stem-exported").exists()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch → the same loss trajectory."""
    common = [*BASE, "--max-steps", "6", "--log-every", "1"]
    one = tmp_path / "one"
    r = subprocess.run(ddpmkit_cmd("run", *common, "--out", str(one)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "ddpmkit", "run", *common, "--out", str(two)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loss = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                      if "loss" in json.loads(l)]
    a, b = loss(one), loss(two)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-6)
    # only rank 0 wrote: one metrics line per step, one checkpoint set
    assert len(list((two / "checkpoints").glob("step-*.safetensors"))) >= 1
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def test_checkpoint_every_n_epochs(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *BASE, "--set", "dataset.limit=64", "--epochs", "3", "--checkpoint-epochs", "2",
                                 "--out", str(run)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*.safetensors"))
    assert names == ["step-00000008.safetensors", "step-00000012.safetensors"]  # epoch 2, and the end (epoch 3)


def test_cuda_rng_states_come_back_in_device_order():
    from ddpmkit.run.train_state import cuda_rng_states

    tensors = {f"rng.cuda.{i}": torch.tensor([i]) for i in range(12)}
    tensors["rng.torch"] = torch.tensor([-1])
    assert [int(t) for t in cuda_rng_states(tensors)] == list(range(12))  # not 0, 1, 10, 11, 2, ...
