"""train → checkpoint → sample → reload → identical samples; same seed → identical weights."""

import json

import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.cli import cli


def test_run_sample_reload_reproducible(tmp_path, tiny_args):
    runner = CliRunner()
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    for run in (run1, run2):
        result = runner.invoke(cli, ["run", "--out", str(run), "--seed", "3", *tiny_args])
        assert result.exit_code == 0, result.output
    # the run directory
    cfg = json.loads((run1 / "config.json").read_text())
    assert cfg["components"]["schedule"] == {"name": "linear", "plugin": "linear", "version": ddpmkit.__version__,
                                             "options": {"timesteps": 20, "beta_start": 1e-4, "beta_end": 0.02}}
    assert cfg["components"]["predictor"]["options"]["block_out_channels"] == [8, 16]
    assert cfg["run"]["seed"] == 3 and cfg["data"] == {"channels": 1, "resolution": 16}
    lines = [json.loads(l) for l in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [3] and all(torch.isfinite(torch.tensor(l["loss"])) for l in lines if "loss" in l)
    grid = Image.open(run1 / "samples.png")
    assert grid.size == (2 * 66 + 2, 2 * 66 + 2)  # 4 samples of 16 px shown ×4, 2 per row, 2 px padding
    assert not list(run1.glob("*.tmp")) and not list(run1.glob(".*"))
    # same seed, same machine → bitwise identical weights and grids
    w1, w2 = load_file(str(run1 / "model.safetensors")), load_file(str(run2 / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert (run1 / "samples.png").read_bytes() == (run2 / "samples.png").read_bytes()
    # a different seed trains different weights
    run3 = tmp_path / "run3"
    assert runner.invoke(cli, ["run", "--out", str(run3), "--seed", "4", *tiny_args]).exit_code == 0
    w3 = load_file(str(run3 / "model.safetensors"))
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)
    # sample from the checkpoint twice via the CLI → identical PNGs, different seeds differ
    outs = []
    for seed, name in ((7, "a.png"), (7, "b.png"), (8, "c.png")):
        r = runner.invoke(cli, ["sample", str(run1 / "model.safetensors"), "-n", "6", "--seed", str(seed),
                                "--out", str(tmp_path / name), "--no-progress", "--device", "cpu"])
        assert r.exit_code == 0, r.output
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    # library: reload → identical samples, equal to the CLI's
    pipe_a = ddpmkit.load_checkpoint(run1, device="cpu")
    pipe_b = ddpmkit.load_checkpoint(run1 / "model.safetensors", device="cpu")
    xa, xb = pipe_a.sample(6, seed=7), pipe_b.sample(6, seed=7)
    assert xa.shape == (6, 1, 16, 16) and torch.equal(xa, xb)
    assert xa.min() >= -1 and xa.max() <= 1 and xa.std() > 0
    ddpmkit.save_grid(xa, tmp_path / "lib.png")
    assert (tmp_path / "lib.png").read_bytes() == outs[0]


def test_library_train_in_process(tmp_path):
    config = ddpmkit.preset_config("tiny")
    config.schedule.options["timesteps"] = 10
    config.dataset.options.update(limit=32, resolution=16)
    config.predictor.options.update(block_out_channels=(8, 16), norm_num_groups=4)
    config.batch_size, config.max_steps, config.num_samples = 8, 2, 2
    pipe = ddpmkit.train(config, tmp_path / "lib-run", device="cpu", progress=False)
    assert (tmp_path / "lib-run" / "model.safetensors").exists()
    again = ddpmkit.load_checkpoint(tmp_path / "lib-run")
    torch.testing.assert_close(pipe.sample(2, seed=1), again.sample(2, seed=1), rtol=0, atol=0)
