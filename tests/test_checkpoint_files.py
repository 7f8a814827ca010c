"""The two kinds of checkpoint file — the model file and the training-state file — are accepted by
every command; resuming from Python is guarded as --resume is."""

import json

import attrs
import pytest
import torch
from click.testing import CliRunner
from conftest import small_run
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.cli import cli

BASE = small_run(max_steps=None, samples=2, ema=0.9)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("files") / "run"
    r = CliRunner().invoke(cli, ["run", *BASE, "--max-steps", "4", "--checkpoint-every", "2", "--out", str(run)])
    assert r.exit_code == 0, r.output
    return run


def test_a_training_state_file_samples_with_its_ema_weights(run, tmp_path):
    final = run / "checkpoints" / "step-00000004.safetensors"
    from_state, from_model = ddpmkit.load_checkpoint(final), ddpmkit.load_checkpoint(run / "model.safetensors")
    model_file = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(v, model_file[k]) for k, v in from_state.model.state_dict().items())
    assert torch.equal(from_state.sample(2, seed=1), from_model.sample(2, seed=1))
    # an earlier state holds other (EMA) weights
    early = ddpmkit.load_checkpoint(run / "checkpoints" / "step-00000002.safetensors")
    assert any(not torch.equal(v, model_file[k]) for k, v in early.model.state_dict().items())
    for args in (["sample", str(final), "-n", "2", "--out", str(tmp_path / "s.png"), "--no-progress"],
                 ["evaluate", str(final), "--metric", "inception-score", "-n", "4", "--no-progress",
                  "--set", "metric.pretrained=false", "--set", "metric.splits=2"],
                 ["export", str(final), str(tmp_path / "exported")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (args[0], r.output)


def test_resuming_from_python_is_checked_against_the_stored_configuration(run):
    stored = ddpmkit.load_checkpoint(run / "checkpoints" / "step-00000004.safetensors").config
    changed = attrs.evolve(stored, lr=0.5, ema_decay=0.5)
    changed.schedule = ddpmkit.ComponentSpec("linear", {"timesteps": 21})
    with pytest.raises(ddpmkit.DdpmkitError) as err:
        ddpmkit.train(changed, run, device="cpu", progress=False, resume=True)
    message = str(err.value)
    assert message.startswith(f"resume: the configuration differs from the one stored in {run}/checkpoints/"
                              "step-00000004.safetensors: schedule.timesteps 21 (run has 20); lr 0.5 (run has")
    assert "ema-decay 0.5 (run has 0.9)" in message and "\n" not in message
    # what a resumed run may change (more steps) passes
    more = attrs.evolve(stored, max_steps=5)
    pipe = ddpmkit.train(more, run, device="cpu", progress=False, resume=True, sample_grid=False)
    assert (run / "checkpoints" / "step-00000005.safetensors").exists() and pipe.diffusion.num_timesteps == 20
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 5]
