"""Post-hoc EMA (EDM2): power-function EMA profiles tracked in training, any length rebuilt afterwards.

Held to ema-pytorch's implementation of EDM2's Algorithm 2–3 on the same inputs, to the profile the
recursion must follow, and to directly tracked profiles; resume keeps the profiles (the SIGKILL test in
test_training_state.py compares them bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import small_run
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.posthoc_ema import PowerEMA, gamma_to_sigma_rel, reconstruct, sigma_rel_to_gamma, solve_weights


def test_gamma_and_the_solve_equal_ema_pytorch_s():
    ema_pytorch = pytest.importorskip("ema_pytorch.post_hoc_ema")
    for s in (0.01, 0.05, 0.10, 0.2):
        assert sigma_rel_to_gamma(s) == pytest.approx(ema_pytorch.sigma_rel_to_gamma(s), rel=1e-10)
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)
    steps = [100, 200, 300, 400] * 2
    gammas = [sigma_rel_to_gamma(0.05)] * 4 + [sigma_rel_to_gamma(0.10)] * 4
    for target in (0.03, 0.07, 0.15):
        ours = solve_weights(steps, gammas, 400, sigma_rel_to_gamma(target))
        theirs = ema_pytorch.solve_weights(torch.tensor(steps), torch.tensor(gammas), torch.tensor([400]),
                                           torch.tensor([sigma_rel_to_gamma(target)]))[:, 0]
        torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)


def test_the_recursion_averages_with_weights_growing_as_t_to_the_gamma():
    """θ_τ = τ for τ = 1..4000: a power-function EMA of exponent γ is Σ τ^γ·τ / Σ τ^γ ≈ t·(γ+1)/(γ+2)."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = PowerEMA(model, (0.05, 0.10, 0.25))
    for t in range(1, 4001):
        model.weight.data.fill_(float(t))
        ema.update(model, t)
    for gamma, shadow in zip(ema.gammas, ema.shadows):
        assert float(shadow[0]) / 4000 == pytest.approx((gamma + 1) / (gamma + 2), rel=2e-3), gamma


def _random_walk(sigma_rels, steps=400, every=20, seed=0):
    """A 3-parameter 'model' whose weights random-walk; its profiles and snapshots of them every `every` steps."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 1, bias=False)
    model.weight.data.zero_()
    ema = PowerEMA(model, sigma_rels)
    snaps = []
    for t in range(1, steps + 1):
        model.weight.data += torch.randn(1, 3, generator=g) * 0.1
        ema.update(model, t)
        if t % every == 0:
            snaps += [(t, gamma, shadow[0].clone()) for gamma, shadow in zip(ema.gammas, ema.shadows)]
    return ema, snaps


def test_a_length_between_the_tracked_ones_is_rebuilt_from_their_snapshots():
    """Profiles 0.05 and 0.10 snapshotted every 20 of 400 steps; the EMA of 0.07, rebuilt from them,
    against 0.07 tracked directly: within 0.5 % of the walk's spread (measured 0.03 %); 0.10 itself
    is rebuilt exactly (its last snapshot, coefficient 1)."""
    tracked, _ = _random_walk((0.07,))
    _, snaps = _random_walk((0.05, 0.10))
    steps, gammas, values = zip(*snaps)
    x = solve_weights(steps, gammas, 400, sigma_rel_to_gamma(0.07))
    rebuilt = sum(w * v.double() for w, v in zip(x.tolist(), values))
    spread = float(torch.stack(values).double().std())
    assert float((rebuilt - tracked.shadows[0][0].double()).abs().max()) < 0.005 * spread
    x = solve_weights(steps, gammas, 400, sigma_rel_to_gamma(0.10))
    assert float((sum(w * v.double() for w, v in zip(x.tolist(), values)) - values[-1].double()).abs().max()) < 1e-9


def test_a_run_stores_profiles_and_ddpmkit_ema_rebuilds_and_scores_lengths(tmp_path, digit_cache):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *small_run(max_steps=8), "--posthoc-ema", "--out", str(run)])
    assert r.exit_code == 0, r.output
    snaps = sorted(p.name for p in (run / "posthoc-ema").iterdir())
    assert len(snaps) == 16 and snaps[-1] == "phema-1-00000008.safetensors"  # every 1/16 of 8 steps: each step
    # the tracked length rebuilt is the tracked weights, to float32 rounding
    state, _, x, step = reconstruct(run, 0.10)
    assert step == 8
    stored = load_file(str(run / "posthoc-ema" / "phema-1-00000008.safetensors"))
    assert max(float((state[k] - stored[k]).abs().max()) for k in stored) <= 1e-6
    r = CliRunner().invoke(cli, ["ema", str(run), "--sigma-rel", "0.04,0.08", "--metric", "digit-score,kid", "-n", "8",
                                 "--set", f"metric.cache_dir={digit_cache}", "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    import json

    info = json.loads((run / "ema.json").read_text())
    assert info["objective"] == "digit_is" and [row["sigma_rel"] for row in info["lengths"]] == [0.04, 0.08]
    assert info["best"]["digit_is"] == max(row["digit_is"] for row in info["lengths"])
    pipe = ddpmkit.load_checkpoint(run / "ema-sigma-0.040.safetensors")  # a model file like any other
    assert pipe.sample(2, seed=0).shape == (2, 1, 16, 16)
    a, b = (load_file(str(run / f"ema-sigma-{s}.safetensors")) for s in ("0.040", "0.080"))
    assert a.keys() == stored.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, says", [
    (["--sigma-rel", "0.3"], "--sigma-rel must be in (0, 0.2887)"),
    (["--sigma-rel", "x"], "--sigma-rel takes relative EMA lengths"),
    (["--sigma-rel", "0.1", "--step", "99"], "--step must be in 1..3"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, says):
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, ["run", *small_run(), "--posthoc-ema", "0.05,0.1", "--out", str(run)]).exit_code == 0
    r = CliRunner().invoke(cli, ["ema", str(run), *args])
    assert r.exit_code == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_run_without_profiles_and_bad_run_options_are_one_line(tmp_path):
    run = tmp_path / "plain"
    assert CliRunner().invoke(cli, ["run", *small_run(), "--out", str(run)]).exit_code == 0
    r = CliRunner().invoke(cli, ["ema", str(run), "--sigma-rel", "0.1"])
    assert r.exit_code == 2 and "has no post-hoc EMA snapshots" in r.stderr and "--posthoc-ema" in r.stderr
    r = CliRunner().invoke(cli, ["run", *small_run(), "--posthoc-ema", "0.05,0.5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "distinct relative EMA lengths in (0, 0.2887)" in r.stderr, r.stderr
    assert math.isclose(gamma_to_sigma_rel(0.0), math.sqrt(1 / 12))
