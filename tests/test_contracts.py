"""ddpmkit.testing's contracts, run on every registered component (built-ins and any installed plugin)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddpmkit
import ddpmkit.testing as contract

ddpmkit.reset_manager()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("name", contract.names("schedule"))
def test_schedule_contract(name):
    contract.check_schedule(name)


@pytest.mark.parametrize("name", contract.names("predictor"))
def test_predictor_contract(name):
    contract.check_predictor(name, block_out_channels=(8, 16), norm_num_groups=4, attention_resolutions=(8,))


@pytest.mark.parametrize("name", contract.names("loss"))
def test_loss_contract(name):
    contract.check_loss(name)


@pytest.mark.parametrize("name", contract.names("sampler"))
def test_sampler_contract(name):
    contract.check_sampler(name)


def test_ddim_contract_with_options():
    contract.check_sampler("ddim", steps=7, eta=0.7, timestep_spacing="trailing")


@pytest.mark.parametrize("name", contract.names("dataset"))
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
        contract.check_dataset(name, **options)
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
        contract.check_schedule("float32-schedule")
    with pytest.raises(AssertionError, match="expected 10 betas"):
        contract.check_schedule("ignores-T")
