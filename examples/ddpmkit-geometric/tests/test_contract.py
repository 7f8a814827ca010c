"""The plugin's own tests: ddpmkit's contract for schedules, run on this schedule."""

import ddpmkit_geometric

import ddpmkit
import ddpmkit.testing as contract


def test_geometric_contract():
    ddpmkit.register_plugin(ddpmkit_geometric, name="geometric-test")
    betas = contract.check_schedule("geometric")
    assert abs(betas[0].item() - 1e-4) < 1e-12 and abs(betas[-1].item() - 0.02) < 1e-12
    ratio = betas[1:] / betas[:-1]
    assert (ratio - ratio[0]).abs().max() < 1e-9  # geometric: a constant ratio
