"""Schedules against their formulas and diffusers; DDIM, prediction targets and min-SNR against diffusers."""

import math

import attrs
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, DDPMScheduler

import ddpmkit
from ddpmkit import GaussianDiffusion
from ddpmkit.cli import cli


@pytest.mark.parametrize("T", [50, 300, 1000])
def test_cosine_formula_and_diffusers(T):
    betas = ddpmkit.build("schedule", "cosine", {"timesteps": T})
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, T // 2, T):
        assert betas[t - 1].item() == pytest.approx(min(1 - f(t) / f(t - 1), 0.999), rel=1e-12)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
    torch.testing.assert_close(betas.float(), ref, rtol=1e-5, atol=1e-7)
    assert betas.max().item() <= 0.999


@pytest.mark.parametrize("T", [300, 1000])
def test_quadratic_and_sigmoid_match_diffusers(T):
    q = ddpmkit.build("schedule", "quadratic", {"timesteps": T, "beta_start": 1e-4, "beta_end": 0.02})
    assert q[0].item() == pytest.approx(1e-4) and q[-1].item() == pytest.approx(0.02)
    assert q[T // 2].item() == pytest.approx(((1e-4**0.5 + 0.02**0.5) / 2) ** 2, rel=1e-2)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02).betas
    torch.testing.assert_close(q.float(), ref, rtol=1e-5, atol=1e-9)
    s = ddpmkit.build("schedule", "sigmoid", {"timesteps": T})
    x = torch.linspace(-6, 6, T, dtype=torch.float64)
    torch.testing.assert_close(s, torch.sigmoid(x) * (0.02 - 1e-4) + 1e-4)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02).betas
    torch.testing.assert_close(s.float(), ref, rtol=1e-5, atol=1e-9)


@attrs.define
class BadCfg:
    timesteps: int = 10


class BadSchedules:
    @staticmethod
    @ddpmkit.hookimpl
    def register_schedules(register):
        register("too-big", lambda c: torch.full((c.timesteps,), 1.5, dtype=torch.float64), BadCfg)
        register("flat", lambda c: torch.zeros(c.timesteps, dtype=torch.float64), BadCfg)


def test_bad_schedule_rejected_naming_the_plugin(tmp_path, tiny_args):
    ddpmkit.register_plugin(BadSchedules(), name="bad-schedules")
    for name, value in (("too-big", "1.5"), ("flat", "0")):
        result = CliRunner().invoke(cli, ["run", "--schedule", name, "--out", str(tmp_path / name), *tiny_args])
        assert result.exit_code == 2
        # the contract's one line: component, plugin (and distribution), what it returned, what was expected
        assert result.stderr.strip() == (f"Error: schedule '{name}' (plugin 'bad-schedules', registered in-process) "
                                         f"returned a float64 tensor of shape (20,) in [{value}, {value}]; "
                                         "expected betas that lie in (0, 1)")
        assert not (tmp_path / name).exists()


def _ddim_pair(T, steps, eta, spacing, clip, prediction, clipped_epsilon=True):
    betas = ddpmkit.build("schedule", "linear", {"timesteps": T})
    d = GaussianDiffusion(betas, clip_sample=clip, prediction=prediction)
    sampler = ddpmkit.build("sampler", "ddim", {"steps": steps, "eta": eta, "timestep_spacing": spacing,
                                                "clipped_epsilon": clipped_epsilon}, diffusion=d)
    ref = DDIMScheduler(num_train_timesteps=T, trained_betas=betas.numpy(), clip_sample=clip, timestep_spacing=spacing,
                        prediction_type={"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}[prediction])
    ref.betas = betas.clone()  # float64 tables, so the comparison is of formulas, not of float32 rounding
    ref.alphas = 1 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, 0)
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    ref.set_timesteps(steps)
    return sampler, ref


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta,clip,prediction,clipped_epsilon", [
    (0.0, False, "epsilon", True), (0.5, True, "epsilon", True), (0.0, True, "epsilon", False),
    (1.0, False, "x0", True), (0.3, True, "v", True), (0.3, True, "v", False)])
def test_ddim_steps_match_diffusers(spacing, eta, clip, prediction, clipped_epsilon):
    """clipped_epsilon (ddpmkit's default) is diffusers' use_clipped_model_output=True; off, diffusers' default."""
    T, steps = 1000, 50
    sampler, ref = _ddim_pair(T, steps, eta, spacing, clip, prediction, clipped_epsilon)
    assert sampler.timesteps == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    for t in sampler.timesteps:
        x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        out = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        z = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None,
                            use_clipped_model_output=clipped_epsilon).prev_sample
        got = sampler.step(out, t, x, z)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"t={t}")
        if clip and t == sampler.timesteps[0]:  # the noisiest step clips: the two choices differ there
            other = ref.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None,
                             use_clipped_model_output=not clipped_epsilon).prev_sample
            assert (got - other).abs().max() > 1e-3


def test_ddim_full_loop_matches_diffusers():
    sampler, ref = _ddim_pair(500, 25, 0.5, "leading", True, "epsilon")
    model = lambda x, t: torch.tanh(x + t.double().view(-1, 1, 1, 1) / 500)  # noqa: E731
    got = sampler.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    for t in ref.timesteps.tolist():
        x = ref.step(model(x, torch.full((2,), t)), t, x, eta=0.5, generator=g, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_ddim_more_steps_than_T_is_an_error():
    d = GaussianDiffusion(torch.linspace(1e-4, 0.02, 100, dtype=torch.float64))
    with pytest.raises(ddpmkit.DdpmkitError, match=r"ddim: --steps 101 is more than the model's T = 100"):
        ddpmkit.build("sampler", "ddim", {"steps": 101}, diffusion=d)


@pytest.mark.parametrize("prediction,ptype", [("x0", "sample"), ("v", "v_prediction")])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_other_targets_match_diffusers(prediction, ptype, clip):
    T = 300
    betas = ddpmkit.build("schedule", "linear", {"timesteps": T})
    ours = GaussianDiffusion(betas, clip_sample=clip, prediction=prediction)
    ref = DDPMScheduler(num_train_timesteps=T, trained_betas=betas.numpy(), clip_sample=clip, prediction_type=ptype)
    ref.betas, ref.alphas = betas.clone(), 1 - betas
    ref.alphas_cumprod, ref.one = torch.cumprod(1 - betas, 0), torch.tensor(1.0, dtype=torch.float64)
    ref.set_timesteps(T)
    g = torch.Generator().manual_seed(1)
    for t in ref.timesteps.tolist()[::7] + [1, 0]:
        x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        out = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        torch.testing.assert_close(ours.p_step(out, x, t, z), expected, rtol=1e-5, atol=1e-5)


def test_training_targets_and_velocity_matches_diffusers():
    T = 1000
    betas = ddpmkit.build("schedule", "cosine", {"timesteps": T})
    ref = DDPMScheduler(num_train_timesteps=T, trained_betas=betas.numpy())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, T, (8,), generator=g)
    v = GaussianDiffusion(betas, prediction="v").target(x0, eps, t)
    torch.testing.assert_close(v, ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    assert torch.equal(GaussianDiffusion(betas, prediction="x0").target(x0, eps, t), x0)
    assert torch.equal(GaussianDiffusion(betas).target(x0, eps, t), eps)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_min_snr_weighting(prediction):
    T, gamma = 100, 5.0
    d = GaussianDiffusion(torch.linspace(1e-4, 0.05, T, dtype=torch.float64), prediction=prediction)
    x0 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    mse = ddpmkit.build("loss", "mse")
    weighted = d.training_loss(model, x0, mse, generator=torch.Generator().manual_seed(5), min_snr_gamma=gamma)
    # recompute by hand with the same draws
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, T, (16,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    target = d.target(x0, eps, t)
    snr = (d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    w = {"epsilon": snr.clamp(max=gamma) / snr, "x0": snr.clamp(max=gamma), "v": snr.clamp(max=gamma) / (snr + 1)}[prediction]
    expected = (w.float() * target.pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(weighted, expected)
    plain = d.training_loss(model, x0, mse, generator=torch.Generator().manual_seed(5))
    assert not torch.isclose(weighted, plain)


def test_cli_sampler_and_targets(tmp_path, tiny_args):
    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(cli, ["run", "--out", str(run), *tiny_args, "--schedule", "cosine", "--prediction", "v",
                            "--min-snr", "5", "--sampler", "ddim", "--steps", "5"])
    assert r.exit_code == 0, r.output
    import json

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["prediction"] == "v" and cfg["run"]["min_snr_gamma"] == 5.0
    assert cfg["components"]["sampler"] == {"name": "ddim", "plugin": "ddim", "version": ddpmkit.__version__,
                                            "options": {"steps": 5, "eta": 0.0, "timestep_spacing": "leading",
                                                        "clipped_epsilon": True}}
    pipe = ddpmkit.load_checkpoint(run)
    assert pipe.diffusion.prediction == "v"
    calls = []
    pipe.sample(2, progress=lambda k, n: calls.append(n))
    assert set(calls) == {5}  # the run's sampler: ddim with 5 steps
    out = tmp_path / "ddim.png"
    for args in (["--sampler", "ddim", "--steps", "10", "--set", "sampler.eta=0.5"], ["--sampler", "ddpm"]):
        r = runner.invoke(cli, ["sample", str(run), "-n", "2", "--out", str(out), "--no-progress", *args])
        assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["sample", str(run), "-n", "2", "--sampler", "ddim", "--steps", "500", "--out", str(out)])
    assert r.exit_code == 2 and "ddim: --steps 500 is more than the model's T = 20" in r.stderr
