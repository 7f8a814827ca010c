"""Numerical edges (issue 32): the discretized Gaussian decoder's gradient, everywhere."""

from __future__ import annotations

import pytest
import torch
from conftest import small_run

from ddpmkit.diffusion import discretized_gaussian_log_likelihood as decoder


def test_decoder_gradient_is_finite_and_matches_finite_differences_from_0_to_20_sd():
    """d/d(mean) and d/d(log_scale) of log p(x) against central differences, for bins at the edges and
    in the middle, the mean 0..20 standard deviations away on both sides (the old where-branch gave NaN
    from ≈ 8 sd)."""
    torch.manual_seed(0)
    log_scale = torch.tensor(-3.0, dtype=torch.float64)
    sd = float(torch.exp(log_scale))
    checked = 0
    for x0 in (-1.0, -0.5, 0.0, 0.5, 1.0):
        for k in torch.linspace(-20, 20, 81, dtype=torch.float64):
            x = torch.tensor([x0], dtype=torch.float64)
            mean = (x + k * sd).requires_grad_(True)
            ls = log_scale.clone().reshape(1).requires_grad_(True)
            value = decoder(x, mean, ls)
            value.sum().backward()
            assert torch.isfinite(value).all() and torch.isfinite(mean.grad).all() and torch.isfinite(ls.grad).all(), \
                (x0, float(k))
            h = 1e-6
            for var, grad, at in ((mean, mean.grad, "mean"), (ls, ls.grad, "log_scale")):
                plus, minus = var.detach().clone(), var.detach().clone()
                plus += h
                minus -= h
                if at == "mean":
                    fd = (decoder(x, plus, ls.detach()) - decoder(x, minus, ls.detach())) / (2 * h)
                else:
                    fd = (decoder(x, mean.detach(), plus) - decoder(x, mean.detach(), minus)) / (2 * h)
                assert torch.allclose(grad, fd, rtol=1e-4, atol=1e-6), (x0, float(k), at, float(grad), float(fd))
                checked += 1
    assert checked == 5 * 81 * 2


def test_decoder_values_are_unchanged_by_the_masking():
    """The value is the same expression as before the masking: the Gaussian mass of the bin, from an
    independent computation with scipy's normal CDF in the middle of the range."""
    from scipy.stats import norm

    x = torch.linspace(-0.9, 0.9, 7, dtype=torch.float64)
    mean, ls = x + 0.03, torch.full_like(x, -3.0)
    s = float(torch.exp(ls[0]))
    ref = torch.log(torch.tensor(norm.cdf((x + 1 / 255 - mean) / s) - norm.cdf((x - 1 / 255 - mean) / s)))
    assert torch.allclose(decoder(x, mean, ls), ref, rtol=1e-10)


@pytest.mark.slow
def test_loss_aware_under_two_ranks_follows_one_process(tmp_path):
    """torchrun, 2 CPU ranks (gloo), loss-aware t at the same global batch as one process: every rank
    learns from the whole batch, so the histories (and so the draws of t, and the losses) are the same."""
    import json
    import os
    import subprocess
    import sys

    from ddpmkit.run.train_state import read_training_state

    common = ["run", *small_run({"dataset.resolution": 8, "schedule.timesteps": 6, "timestep_sampler.history": 2,
                                 "predictor.attention_resolutions": 2}, timestep_sampler="loss-aware", batch_size=8,
                                max_steps=8, log_every=1, samples=1, seed=3, ema=0)]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "ddpmkit", *common, "--out", str(one)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "ddpmkit", *common, "--out", str(two)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    states = []
    for d in (one, two):
        _, meta = read_training_state(sorted((d / "checkpoints").glob("step-*.safetensors"))[-1])
        states.append(meta["timestep_sampler"])
    a, b = states
    # every t seen as often (the same draws), the remembered losses equal to float rounding
    assert a["counts"] == b["counts"] and min(a["counts"]) == 2  # warmed up: the draws were loss-aware
    assert torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-4, atol=1e-7)
    loss = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                      if '"loss"' in x]
    torch.testing.assert_close(torch.tensor(loss(two)), torch.tensor(loss(one)), rtol=1e-4, atol=1e-6)


SAMPLER_GRID = {
    "ddpm": {},
    "ddim": {"eta": [0.0, 1.0], "timestep_spacing": ["leading", "trailing", "linspace"], "clipped_epsilon": [True, False]},
    "dpm-solver++": {"order": [1, 2, 3], "algorithm": ["dpmsolver++", "sde-dpmsolver++"], "lower_order_final": [True, False],
                     "karras_sigmas": [True, False], "thresholding": [True, False],
                     "timestep_spacing": ["leading", "trailing", "linspace"]},
    "unipc": {"order": [1, 2, 3], "solver_type": ["bh1", "bh2"], "lower_order_final": [True, False],
              "karras_sigmas": [True, False], "thresholding": [True, False],
              "timestep_spacing": ["leading", "trailing", "linspace"]},
    "heun": {"karras_sigmas": [True, False], "timestep_spacing": ["leading", "trailing", "linspace"]},
    "euler-ancestral": {"timestep_spacing": ["leading", "trailing", "linspace"]},
}


def test_every_accepted_sampler_option_combination_samples_finite_images():
    """Every option combination of every built-in sampler, on linear and cosine T = 1000 at 5 and 20
    steps (a fixed random third of the 1,800 combinations), with a zero network: the samples are finite,
    or the combination is refused when the sampler is built, in one line."""
    import itertools
    import random
    import warnings

    import ddpmkit
    from ddpmkit.run.assembly import build_sampler

    combos = []
    for schedule in ("linear", "cosine"):
        for name, grid in SAMPLER_GRID.items():
            for values in itertools.product(*grid.values()):
                for steps in (5, 20):
                    options = dict(zip(grid, values))
                    if name != "ddpm":
                        options["steps"] = steps
                    elif steps == 20:
                        continue
                    combos.append((schedule, name, options))
    chosen = random.Random(0).sample(combos, len(combos) // 3)
    diffusions = {s: ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", s, {"timesteps": 1000}))
                  for s in ("linear", "cosine")}
    refused = sampled = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for schedule, name, options in chosen:
            try:
                sampler, _ = build_sampler(name, options, diffusions[schedule])
            except ddpmkit.DdpmkitError as exc:
                assert "\n" not in str(exc) and str(exc).startswith(name), str(exc)
                refused += 1
                continue
            x = sampler.sample(lambda x, t: torch.zeros_like(x), (1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(x).all(), (schedule, name, options)
            sampled += 1
    assert refused > 0 and sampled > refused  # both kinds are in the sample


def test_issue_reproductions_are_refused_in_one_line():
    import ddpmkit
    from ddpmkit.run.assembly import build_sampler

    cosine = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "cosine", {"timesteps": 1000}))
    try:
        build_sampler("dpm-solver++", {"steps": 20, "karras_sigmas": True}, cosine)
        raise AssertionError("not refused")
    except ddpmkit.DdpmkitError as exc:
        assert str(exc) == ("dpm-solver++: its first 5 of 20 steps fall on the same training timestep t = 999 (the "
                            "schedule's σ_max = 2.03e+04), which the solver cannot step through; use karras_sigmas=false, "
                            "fewer steps, or a schedule with a smaller σ_max (e.g. linear)")
    linear = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 1000}))
    try:
        build_sampler("unipc", {"steps": 20, "lower_order_final": False}, linear)  # order 2, bh2
        raise AssertionError("not refused")
    except ddpmkit.DdpmkitError as exc:
        assert str(exc) == ("unipc: lower_order_final=false with order 2, solver_type bh2 cannot take the last step "
                            "to σ = 0 (NaN or a singular system); keep lower_order_final=true (the default), or use "
                            "solver_type=bh1")
    # what still works: the same solvers without the refused option
    for name, options in (("dpm-solver++", {"steps": 20}), ("unipc", {"steps": 20, "lower_order_final": False,
                                                                      "solver_type": "bh1"})):
        sampler, _ = build_sampler(name, options, cosine)
        assert torch.isfinite(sampler.sample(lambda x, t: torch.zeros_like(x), (1, 1, 4, 4))).all()


# (sampler, options) × schedule: every sampler on the analytic Gaussian case. Bands for the sample
# variance over the data's at 20 and 50 steps; measured (20 000 samples): ddim 0.76/0.90 (linear),
# 0.87/0.95 (cosine); euler-ancestral 0.60/0.80 and 0.73/0.89; dpm-solver++ and unipc 0.92-1.01;
# heun 1.05/1.02 (linear), 1.03/1.01 (cosine, leading spacing). Heun on the cosine schedule with
# linspace spacing gave 5.7 at 20 steps before it was refused.
BANDS = {20: (0.55, 1.15), 50: (0.75, 1.10)}
GAUSSIAN_SAMPLERS = [("ddim", {}), ("dpm-solver++", {}), ("unipc", {}), ("heun", {}), ("euler-ancestral", {})]


def test_every_sampler_on_gaussian_data_with_the_exact_denoiser():
    """Data N(0, s²I), s² = 0.25: the optimal ε-predictor is closed-form, so each sampler's samples must
    have mean ≈ 0 and variance ≈ s², within the stated band, on linear and cosine at 20 and 50 steps
    (ddpm: T = 1000 steps, band 0.9-1.1)."""
    import warnings

    import ddpmkit
    from ddpmkit.run.assembly import build_sampler

    s2, n = 0.25, 4000
    for schedule in ("linear", "cosine"):
        d = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", schedule, {"timesteps": 1000}))
        ab = d.alphas_cumprod.double()

        def net(x, t, ab=ab):
            a = ab[t].view(-1, 1, 1, 1).to(x.dtype)
            return (1 - a).sqrt() * x / (a * s2 + 1 - a)

        runs = [("ddpm", {}, (0.9, 1.1))] + [(name, {**opts, "steps": steps}, BANDS[steps])
                                             for name, opts in GAUSSIAN_SAMPLERS for steps in (20, 50)]
        for name, options, (lo, hi) in runs:
            if name == "heun" and schedule == "cosine":
                options = {**options, "timestep_spacing": "leading"}  # the default spacing is refused there
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sampler, _ = build_sampler(name, options, d)
                x = sampler.sample(net, (n, 1, 1, 1), generator=torch.Generator().manual_seed(1))
            ratio = float(x.var() / s2)
            assert lo <= ratio <= hi, (schedule, name, options, ratio)
            assert abs(float(x.mean())) < 0.05, (schedule, name, options, float(x.mean()))
    with pytest.raises(ddpmkit.DdpmkitError, match=r"^heun: the schedule's σ_max = 2.03e\+04 makes its first step"):
        build_sampler("heun", {"steps": 20}, d)  # cosine, linspace


def _constant_x0_network(diffusion, prediction: str, target: float):
    """The exact network output for data that is the constant ``target`` (outside [-1, 1])."""
    ab = diffusion.alphas_cumprod

    def net(x, t):
        a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        x0 = torch.full_like(x, target)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v": a * eps - s * x0, "x0": x0}[prediction]

    return net


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_every_built_in_sampler_clips_when_the_run_clips(prediction):
    """Item 3: a network that predicts x̂_0 = 3 everywhere ends at 3 without clipping and at the clip
    bound 1 with it, for every built-in sampler (dpm-solver++, unipc and euler-ancestral ignored
    --clip before: they ended at 3)."""
    import ddpmkit
    from ddpmkit.run.assembly import build_sampler

    for clip in (False, True):
        d = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 100}), clip_sample=clip,
                                      prediction=prediction)
        for name in ("ddpm", "ddim", "dpm-solver++", "unipc", "heun", "euler-ancestral"):
            if name == "euler-ancestral" and prediction == "x0":
                continue  # refused when built (diffusers' scheduler has no x0 target)
            sampler, _ = build_sampler(name, {} if name == "ddpm" else {"steps": 10}, d)
            assert sampler.uses_clip_sample
            x = sampler.sample(_constant_x0_network(d, prediction, 3.0), (2, 1, 4, 4),
                               generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(x, torch.full_like(x, 1.0 if clip else 3.0), rtol=0, atol=1e-5,
                                       msg=f"{name} clip={clip}")


@pytest.mark.parametrize("name", ["dpm-solver++", "unipc"])
def test_solver_clipping_equals_diffusers_thresholding_at_range_one(name):
    """For the range [-1, 1] the rewritten output steps exactly as diffusers' own ``thresholding=True``
    (sample_max_value 1) does inside the solver: same samples to float32 rounding."""
    import ddpmkit
    from ddpmkit.run.assembly import build_sampler

    torch.manual_seed(0)
    weight = torch.randn(16, 16) * 1.5

    def net(x, t):  # a network whose x̂_0 leaves [-1, 1] at every step
        return (x.flatten(1) @ weight).view_as(x)

    schedule = ddpmkit.build("schedule", "linear", {"timesteps": 100})
    clipping = ddpmkit.GaussianDiffusion(schedule, clip_sample=True)
    plain = ddpmkit.GaussianDiffusion(schedule)
    shape, g = (3, 1, 4, 4), lambda: torch.Generator().manual_seed(0)
    ours = build_sampler(name, {"steps": 10}, clipping)[0].sample(net, shape, generator=g())
    theirs = build_sampler(name, {"steps": 10, "thresholding": True}, plain)[0].sample(net, shape, generator=g())
    unclipped = build_sampler(name, {"steps": 10}, plain)[0].sample(net, shape, generator=g())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - unclipped).abs().max() > 1.0  # clipping mattered on this network
    # dynamic thresholding proper (s up to 3, the 0.9 quantile) reaches the scheduler and differs
    dynamic = build_sampler(name, {"steps": 10, "thresholding": True, "sample_max_value": 3.0,
                                   "dynamic_thresholding_ratio": 0.9}, plain)[0]
    assert (dynamic.scheduler.config.sample_max_value, dynamic.scheduler.config.dynamic_thresholding_ratio) == (3.0, 0.9)
    assert (dynamic.sample(net, shape, generator=g()) - theirs).abs().max() > 0.1


def test_a_sampler_that_ignores_the_runs_clipping_warns_once():
    """A third-party sampler without ``uses_clip_sample`` on a clipping run: one warning, once; the
    built-ins say nothing."""
    import warnings

    import ddpmkit
    from ddpmkit.run.pipeline import Pipeline

    class NoClip:
        @ddpmkit.hookimpl
        def register_samplers(self, register):
            class Sampler:
                num_steps = 1

                def __init__(self, config=None, *, diffusion):
                    pass

                def sample(self, model, shape, generator=None, device="cpu", progress=None, dtype=torch.float32):
                    return torch.zeros(shape, dtype=dtype)

            register("no-clip", Sampler, None, "returns zeros")

    ddpmkit.register_plugin(NoClip(), name="no-clip")
    config = ddpmkit.preset_config("tiny")
    config.clip_sample = True
    diffusion = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 10}), clip_sample=True)
    pipe = Pipeline(torch.nn.Conv2d(1, 1, 1), diffusion, 1, 4, config, torch.device("cpu"))
    pipe.model = lambda x, t: torch.zeros_like(x)
    pipe.model.training, pipe.model.eval, pipe.model.train = False, lambda: None, lambda mode: None
    ddpmkit.run.pipeline._WARNED_CLIP.clear()  # once per process: forget earlier tests in this worker
    with pytest.warns(UserWarning, match=r"sampler 'no-clip' ignores the run's clipping of x̂_0 to ±1 \(--clip\)"):
        pipe.sample(1, sampler="no-clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once only; never for a built-in
        pipe.sample(1, sampler="no-clip")
        for name in ("ddpm", "ddim", "dpm-solver++", "unipc", "heun", "euler-ancestral"):
            pipe.sample(1, sampler=name, sampler_options={} if name == "ddpm" else {"steps": 2})
