"""ddpmkit.testing's contracts, run on every registered component (built-ins and any installed plugin)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpmkit
from ddpmkit.sdk import testing as plugin_testing

ddpmkit.reset_manager()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("name", plugin_testing.names("schedule"))
def test_schedule_contract(name):
    plugin_testing.check_schedule(name)


@pytest.mark.parametrize("name", plugin_testing.names("predictor"))
def test_predictor_contract(name):
    plugin_testing.check_predictor(name, block_out_channels=(8, 16), norm_num_groups=4, attention_resolutions=(8,))


@pytest.mark.parametrize("name", plugin_testing.names("loss"))
def test_loss_contract(name):
    plugin_testing.check_loss(name)


@pytest.mark.parametrize("name", plugin_testing.names("process"))
def test_process_contract(name):
    plugin_testing.check_process(name)


@pytest.mark.parametrize("name", plugin_testing.names("sampler"))
def test_sampler_contract(name):
    plugin_testing.check_sampler(name)


def test_ddim_contract_with_options():
    plugin_testing.check_sampler("ddim", steps=7, eta=0.7, timestep_spacing="trailing")


@pytest.mark.parametrize("name", plugin_testing.names("dataset"))
def test_dataset_contract(name, tmp_path, monkeypatch, aircraft_tree):
    monkeypatch.setenv("DDPMKIT_DATA", str(tmp_path / "cache"))
    options = {"limit": 8, "resolution": 16}
    if name == "image-folder":
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        options["path"] = str(tmp_path)
    elif name in ("mnist", "fashion-mnist", "cifar10", "aircraft"):
        options["download"] = False
        if name == "mnist":
            options.update(data_root=str(SHARED / "mnist"), split="test")
        if name == "cifar10":
            options["data_root"] = str(SHARED / "cifar10-test")
        if name == "aircraft":
            options["data_root"] = str(aircraft_tree)
    try:
        plugin_testing.check_dataset(name, **options)
    except ddpmkit.DdpmkitError as exc:  # the data is not on this machine
        pytest.skip(str(exc))


def test_contract_catches_a_bad_schedule():
    import attrs
    import torch

    @attrs.define
    class Cfg:
        timesteps: int = 10

    class Bad:
        @staticmethod
        @ddpmkit.hookimpl
        def register_schedules(register):
            register("float32-schedule", lambda c: torch.full((c.timesteps,), 0.1), Cfg)
            register("ignores-T", lambda c: torch.full((5,), 0.1, dtype=torch.float64), Cfg)

    ddpmkit.register_plugin(Bad(), name="bad")
    with pytest.raises(AssertionError, match="must be float64"):
        plugin_testing.check_schedule("float32-schedule")
    with pytest.raises(AssertionError, match="expected 10 betas"):
        plugin_testing.check_schedule("ignores-T")


def test_check_predictor_accepts_a_zero_initialised_last_layer_and_refuses_float64():
    """A last layer that starts at zero (a standard diffusion choice) still gets a gradient through the
    check; an answer in float64 for float32 input does not pass."""
    import torch

    class ZeroLast(torch.nn.Module):
        def __init__(self, channels, dtype=torch.float32):
            super().__init__()
            self.body = torch.nn.Conv2d(channels, 8, 3, padding=1)
            self.out = torch.nn.Conv2d(8, channels, 3, padding=1)
            torch.nn.init.zeros_(self.out.weight), torch.nn.init.zeros_(self.out.bias)
            self.dtype = dtype

        def forward(self, x, t):
            return self.out(torch.relu(self.body(x))).to(self.dtype)

    class Plugin:
        @staticmethod
        @ddpmkit.hookimpl
        def register_predictors(register):
            register("zero-last", lambda *, channels, resolution: ZeroLast(channels))
            register("zero-last-64", lambda *, channels, resolution: ZeroLast(channels, torch.float64))

    ddpmkit.register_plugin(Plugin(), name="zero")
    model = plugin_testing.check_predictor("zero-last")
    assert torch.count_nonzero(model.out.weight.grad) > 0
    with pytest.raises(AssertionError, match=r"returned a float64 tensor .* expected output in the input's dtype"):
        plugin_testing.check_predictor("zero-last-64")


def test_unet2d_patch_stem_keeps_pixels_and_the_prediction_before_the_variance():
    """patch_size=2 at 28×28: the contract holds (shape, dtype, gradients, round trip; with a learned variance,
    and with pad=2); the stem is exactly undone: a U-Net that returns (h, −h) gives (x, −x) back, each
    pixel in place and the prediction's channel before the variance's."""
    from types import SimpleNamespace

    opts = dict(block_out_channels=(8, 16), norm_num_groups=4, attention_resolutions=(7,), patch_size=2)
    model = plugin_testing.check_predictor("unet2d", resolution=28, learn_variance=True, **opts)
    assert model.unet.config.sample_size == 14 and model.unet.config.in_channels == 4
    assert model.stem == {"patch_size": 2, "pad": 0}
    # a pad alone is a stem too (export refuses it); no patch and no pad is none
    small = dict(block_out_channels=(8, 16), norm_num_groups=4, attention_resolutions=())
    assert ddpmkit.build("predictor", "unet2d", {**small, "pad": 1}, channels=1, resolution=14).stem == \
        {"patch_size": 1, "pad": 1}
    assert ddpmkit.build("predictor", "unet2d", small, channels=1, resolution=16).stem == {}

    class Mirror(torch.nn.Module):
        def forward(self, h, t, class_labels=None):
            return SimpleNamespace(sample=torch.cat([h, -h], 1))

    model.unet = Mirror()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x, torch.zeros(3, dtype=torch.long)), torch.cat([x, -x], 1))
    with pytest.raises(ddpmkit.DdpmkitError, match="patch_size=3 must divide the resolution 28"):
        ddpmkit.build("predictor", "unet2d", {"patch_size": 3}, channels=1, resolution=28, num_classes=None)
    # pad=2: 28 + 4 = 32 → 16 inside, three levels; the padding is cropped away again, pixel for pixel
    padded = plugin_testing.check_predictor("unet2d", resolution=28, **{**opts, "block_out_channels": (8, 16, 16),
                                                                   "attention_resolutions": (8,), "pad": 2})
    assert padded.unet.config.sample_size == 16
    class Same(torch.nn.Module):
        def forward(self, h, t, class_labels=None):
            return SimpleNamespace(sample=h)

    padded.unet = Same()
    assert torch.equal(padded(x, torch.zeros(3, dtype=torch.long)), x)
