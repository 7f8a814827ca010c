"""The diffusion process as a plugin kind (issue 29): ``vp`` behind the kind builds exactly the
GaussianDiffusion it always did; ``flow`` (flow matching) trains, samples, resumes and refuses what
does not fit, its ODE steps agree with diffusers' flow-matching scheduler, and on Gaussian data its
Euler and Heun samplers converge to the data's mean and variance."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import small_run

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.assembly import build_process, build_sampler


def invoke(*args):
    return CliRunner().invoke(cli, [*args])


def test_vp_is_the_default_and_builds_the_same_gaussian_diffusion():
    """vp is RunConfig's default process (and laptop-vp's, the default preset before issue 30)."""
    assert ddpmkit.RunConfig().process.name == "vp" and ddpmkit.preset_config("tiny").process.name == "vp"
    config = ddpmkit.preset_config("laptop-vp")
    assert config.process.name == "vp"
    process, _, proc_cfg = build_process(config)
    betas = ddpmkit.build("schedule", "linear", {"timesteps": 500})
    direct = ddpmkit.GaussianDiffusion(betas, variance_type=config.variance_type, clip_sample=config.clip_sample,
                                       prediction=config.prediction)
    assert type(process) is ddpmkit.GaussianDiffusion and proc_cfg is None
    for name in ("betas", "alphas_cumprod", "sigma", "posterior_mean_coef1", "posterior_log_variance_clipped"):
        assert torch.equal(getattr(process, name), getattr(direct, name)), name
    assert (process.variance_type, process.clip_sample, process.prediction) == \
        (direct.variance_type, direct.clip_sample, direct.prediction)


def _flow(**options):
    config = ddpmkit.preset_config("tiny")
    config.process, config.clip_sample = ddpmkit.ComponentSpec("flow", options), False
    return build_process(config)[0]


def test_flow_euler_steps_equal_diffusers_flow_match_euler_scheduler():
    """On diffusers' own time grid (shift 1), the network gets the scheduler's timesteps and each Euler
    step is FlowMatchEulerDiscreteScheduler.step, on a network whose velocity depends on x and t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddpmkit.sdk.ode import ODESampler

    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    theirs.set_timesteps(7)
    process = _flow()
    process.grid = lambda steps, device="cpu": theirs.sigmas.double()  # their grid, for the comparison
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    seen = []

    def net(x, c):
        seen.append(c[0].item())
        return (x.flatten(1) @ weight).view_as(x) * (1 + c.view(-1, 1, 1, 1) / 1000)

    ours = ODESampler(process, 7).sample(net, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    x = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    for t in theirs.timesteps:
        x = theirs.step(net(x, t.expand(2)), t, x).prev_sample
    assert seen[:7] == pytest.approx(theirs.timesteps.tolist(), rel=1e-6)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heun", [False, True])
def test_flow_ode_samplers_converge_on_gaussian_data(heun):
    """Data N(μ, s²I) with the exact velocity E[ε − x_0 | x_t]: the samples' variance over s² is within
    the stated band at 8, 32 and 128 steps and approaches 1; the mean is μ within sampling noise.
    (Measured: Euler 0.687, 0.909, 0.975; Heun 0.939, 0.995, 0.998 on 64,000 values.)"""
    from ddpmkit.sdk.ode import ODESampler

    mu, s2 = 0.5, 0.25
    process, net = _gaussian_networks(mu, s2)["flow"]

    bands = {False: {8: (0.60, 0.78), 32: (0.87, 0.95), 128: (0.95, 1.0)},
             True: {8: (0.90, 0.97), 32: (0.98, 1.02), 128: (0.98, 1.02)}}[heun]
    ratios = []
    for steps, (low, high) in bands.items():
        x = ODESampler(process, steps, heun=heun).sample(net, (4000, 1, 4, 4),
                                                         generator=torch.Generator().manual_seed(0)).double()
        ratios.append(float(x.var()) / s2)
        assert abs(float(x.mean()) - mu) < 0.01, steps
        assert low <= ratios[-1] <= high, (steps, ratios[-1])
    assert abs(ratios[2] - 1) < abs(ratios[0] - 1)


def test_samplers_say_which_processes_they_serve():
    flow, vp = _flow(), build_process(ddpmkit.preset_config("tiny"))[0]
    for name in ("ddpm", "ddim", "dpm-solver++", "unipc", "euler-ancestral"):
        with pytest.raises(ddpmkit.DdpmkitError) as err:
            build_sampler(name, {}, flow)
        assert str(err.value) == f"sampler '{name}' does not serve the 'flow' process; samplers that do: euler, heun"
    with pytest.raises(ddpmkit.DdpmkitError, match="^sampler 'edm-sde' does not serve the 'vp' process"):
        build_sampler("edm-sde", {}, vp)
    assert build_sampler("heun", {"steps": 3}, flow)[0].num_steps == 5
    assert build_sampler("heun", {"steps": 3}, vp)[0].num_steps == 5


def test_a_flow_run_trains_samples_resumes_and_refuses_what_does_not_fit(tmp_path):
    run = tmp_path / "run"
    args = small_run({"schedule.timesteps": None}, max_steps=4, samples=4, class_conditional=True, label_dropout=0.1)
    r = invoke("run", "--process", "flow", "--sampler", "euler", "--steps", "3", *args, "--out", str(run))
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["components"]["process"]["name"] == "flow" and cfg["components"]["process"]["options"]["time"] == "uniform"
    pipe = ddpmkit.load_checkpoint(run)
    assert pipe.diffusion.name == "flow"
    a = pipe.sample(4, seed=3, sampler="heun", sampler_options={"steps": 2}, guidance=3.0)
    b = pipe.sample(4, seed=3, sampler="heun", sampler_options={"steps": 2}, guidance=3.0)
    assert a.shape == (4, 1, 16, 16) and torch.isfinite(a).all() and torch.equal(a, b)
    r = invoke("run", "--resume", str(run), "--max-steps", "6", "--no-progress", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] <= 6
    refusals = [
        (["sample", str(run), "--sampler", "ddim", "-n", "2"],
         "Error: sampler 'ddim' does not serve the 'flow' process; samplers that do: euler, heun"),
        (["export", str(run), str(tmp_path / "exported")],
         "Error: export to diffusers writes a DDPMPipeline, which runs the vp process; this run's process is 'flow'"),
        (["evaluate", str(run), "--metric", "nll", "-n", "2", "--no-progress"],
         "Error: nll is the variational bound of the vp process; this run's process is 'flow'"),
        (["run", "--process", "flow", "--prediction", "x0", *args],
         "Error: process 'flow' predicts the velocity ε − x_0; --prediction x0 is for the vp process (drop it, "
         "or use --process vp)"),
        (["run", "--process", "flow", "--min-snr", "5", *args],
         "Error: --min-snr weights the vp process's timesteps; process 'flow' has none (drop it)"),
        (["run", "--process", "flow", "--timestep-sampler", "loss-aware", *args],
         "Error: --timestep-sampler loss-aware draws the vp process's timesteps; process 'flow' draws its own times "
         "(see its options: ddpmkit plugins --options)"),
        (["run", "--process", "flow", "--schedule", "cosine", *args],
         "Error: --schedule sets the vp process's β schedule; process 'flow' has its own time distribution and "
         "reads none (drop --schedule / --set schedule.*, or use --process vp)"),
        (["run", "--process", "edm", "--set", "schedule.timesteps=100", *args],
         "Error: --schedule sets the vp process's β schedule; process 'edm' has its own time distribution and "
         "reads none (drop --schedule / --set schedule.*, or use --process vp)"),
        (["run", "--process", "flw", *args], None),
    ]
    for argv, line in refusals:
        r = invoke(*argv, "--device", "cpu") if argv[0] in ("sample", "evaluate") else invoke(*argv)
        assert r.exit_code == 2, (argv, r.output)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        if line is not None:
            assert r.stderr.strip() == line
        else:
            assert "did you mean 'flow'?" in r.stderr


def test_the_process_is_a_kind_plugins_list():
    r = invoke("plugins", "--json")
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["vp"]["components"] == {"process": ["vp"]} and rows["flow"]["components"] == {"process": ["flow"]}
    assert ddpmkit.available("process") == ["edm", "flow", "vp"]


def test_a_sweep_space_may_search_over_the_process():
    from ddpmkit.sweep import trial_config

    config = trial_config("tiny", {"process": "flow", "process.time": "logit-normal", "sampler": "heun"})
    assert (config.process.name, config.process.options, config.sampler.name) == \
        ("flow", {"time": "logit-normal"}, "heun")
    # a space that chooses the process and the schedule draws a schedule for every trial: a flow trial's
    # is left unread (on the command line the same pair is refused, test above)
    config = trial_config("tiny", {"process": "flow", "schedule": "cosine", "sampler": "heun"})
    assert (config.process.name, config.schedule.name) == ("flow", "cosine")


def _edm(**options):
    config = ddpmkit.preset_config("tiny")
    config.process, config.clip_sample = ddpmkit.ComponentSpec("edm", options), False
    return build_process(config)[0]


def test_edm_preconditioning_and_euler_steps_equal_diffusers_edm_euler_scheduler():
    """EDM's c_in, c_noise, D = c_skip·x + c_out·F and the Euler step on the ρ-grid: our sampler and a
    loop of diffusers' EDMEulerScheduler (prediction_type "epsilon" is EDM's F) on one network."""
    from diffusers import EDMEulerScheduler

    from ddpmkit.sdk.ode import ODESampler

    theirs = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, prediction_type="epsilon")
    theirs.set_timesteps(9)
    process = _edm()
    torch.testing.assert_close(process.grid(9).float(), theirs.sigmas.float(), rtol=1e-5, atol=1e-7)
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    net = lambda x, c: torch.tanh((x.flatten(1) @ weight).view_as(x)) * (1 + c.view(-1, 1, 1, 1))  # noqa: E731
    ours = ODESampler(process, 9).sample(net, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    x = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(0)) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        x = theirs.step(net(theirs.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("heun", [False, True])
def test_edm_ode_samplers_converge_on_gaussian_data(heun):
    """Data N(μ, s²I) and the ideal denoiser D(x; σ) = μ + s²/(s² + σ²)·(x − μ), as the network F that
    EDM's preconditioning turns into it: the variance over s² is within the stated band at 8, 32 and
    128 steps of the ρ-grid and approaches 1. (Measured: Euler 0.442, 0.831, 0.954; Heun 1.94 — its first
    step from σ_max = 80 overshoots at 8 steps — 1.029, 0.999, on 64,000 values.)"""
    from ddpmkit.sdk.ode import ODESampler

    mu, s2 = 0.5, 0.25
    process, net = _gaussian_networks(mu, s2)["edm"]

    bands = {False: {8: (0.35, 0.55), 32: (0.78, 0.88), 128: (0.93, 0.98)},
             True: {8: (1.5, 2.4), 32: (0.99, 1.07), 128: (0.98, 1.02)}}[heun]
    ratios = []
    for steps, (low, high) in bands.items():
        x = ODESampler(process, steps, heun=heun).sample(net, (4000, 1, 4, 4),
                                                         generator=torch.Generator().manual_seed(0)).double()
        ratios.append(float(x.var()) / s2)
        assert abs(float(x.mean()) - mu) < 0.02, (steps, float(x.mean()))
        assert low <= ratios[-1] <= high, (steps, ratios[-1])
    assert abs(ratios[2] - 1) < abs(ratios[0] - 1)


def test_an_edm_run_trains_and_samples_with_guidance(tmp_path):
    run = tmp_path / "run"
    r = invoke("run", "--process", "edm", "--sampler", "heun", "--steps", "3",
               *small_run({"schedule.timesteps": None}, max_steps=3, samples=4, class_conditional=True,
                         label_dropout=0.1), "--out", str(run))
    assert r.exit_code == 0, r.output
    pipe = ddpmkit.load_checkpoint(run)
    assert pipe.diffusion.name == "edm" and pipe.config.process.options == {}
    assert pipe.config.loss.name == "mse" and "meant to train with loss" not in r.output  # edm's own loss
    x = pipe.sample(4, seed=1, sampler="euler", sampler_options={"steps": 4}, guidance=2.0)
    assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all()


def test_edm_trains_with_mse_unless_the_user_names_a_loss_and_another_loss_is_noted():
    """The laptop preset's smooth-L1 breaks EDM's λ(σ) weighting (docs/processes.md): switching to edm
    switches to mse; a loss the user names is kept, with one note; vp and flow keep the preset's."""
    from ddpmkit.run.assembly import assemble
    from ddpmkit.run.presets import resolve_run_config

    assert resolve_run_config(None, {"process": "edm"}).loss.name == "mse"
    assert resolve_run_config(None, {"process": "flow"}).loss.name == "smoothl1"
    assert resolve_run_config(None).loss.name == "smoothl1"
    kept = resolve_run_config("tiny", {"process": "edm", "loss": "smoothl1", "sampler": "euler"}, {"dataset": {"limit": "8"}},
                              {"clip_sample": False})
    assert kept.loss.name == "smoothl1"
    notes = [n for n in assemble(kept).notes if "meant to train with loss 'mse'" in n]
    assert len(notes) == 1 and "this run uses 'smoothl1'" in notes[0], notes


def test_edm_sde_without_churn_is_heun_and_with_churn_converges_on_gaussian_data():
    """Algorithm 2 with S_churn = 0 is Algorithm 1 (heun) bit for bit; with the paper's churn (S_churn 40)
    on the Gaussian case the samples' variance approaches the data's as steps grow (32 and 128 steps),
    the mean stays; the same for a seed, different for another."""
    from ddpmkit.sdk.ode import ODESampler

    mu, s2 = 0.5, 0.25
    process, net = _gaussian_networks(mu, s2)["edm"]

    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    plain = build_sampler("edm-sde", {"steps": 12, "s_churn": 0.0}, process)[0]
    assert plain.num_steps == 23
    torch.testing.assert_close(plain.sample(net, (8, 1, 4, 4), generator=g(0)),
                               ODESampler(process, 12, heun=True).sample(net, (8, 1, 4, 4), generator=g(0)), rtol=0, atol=0)
    ratios = []
    for steps, (low, high) in {32: (1.05, 1.15), 128: (0.99, 1.05)}.items():  # measured 1.104, 1.024
        x = build_sampler("edm-sde", {"steps": steps}, process)[0].sample(net, (4000, 1, 4, 4), generator=g(0)).double()
        ratios.append(float(x.var()) / s2)
        assert abs(float(x.mean()) - mu) < 0.02 and low <= ratios[-1] <= high, (steps, float(x.mean()), ratios[-1])
    assert abs(ratios[1] - 1) < abs(ratios[0] - 1)
    sde = build_sampler("edm-sde", {"steps": 32}, process)[0]
    a, b, c = (sde.sample(net, (2, 1, 4, 4), generator=g(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ddpmkit.DdpmkitError, match="^sampler 'edm-sde' does not serve the 'flow' process"):
        build_sampler("edm-sde", {}, _flow())


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("clip", [False, True])
def test_euler_on_vp_is_ddim_with_eta_0(prediction, clip):
    """vp's ODE in x̃ = x_t/√ᾱ_t (σ_t = √((1 − ᾱ_t)/ᾱ_t)) on trailing timesteps: Euler's method is
    DDIM with η = 0 step for step (Song et al. 2021), for every prediction target and with clipping
    (measured max difference ≤ 1.5e-6 in float32)."""
    d = ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 100}), clip_sample=clip,
                                  prediction=prediction)
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 0.4
    net = lambda x, t: torch.tanh((x.flatten(1) @ weight).view_as(x)) * (1 + t.view(-1, 1, 1, 1) / 100)  # noqa: E731
    ours = build_sampler("euler", {"steps": 10}, d)[0].sample(net, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    ddim = build_sampler("ddim", {"steps": 10, "timestep_spacing": "trailing"}, d)[0]
    theirs = ddim.sample(net, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _gaussian_networks(mu: float, s2: float):
    """The exact network of each process for data N(μ, s²I): flow's velocity, EDM's F, vp's ε."""
    import math

    flow, edm = _flow(), _edm()
    config = ddpmkit.preset_config("tiny")
    config.clip_sample = False
    config.schedule.options["timesteps"] = 1000
    vp = build_process(config)[0]
    ab = vp.alphas_cumprod.double()

    def flow_net(x, c):
        t, x = (c / 1000).double().view(-1, 1, 1, 1), x.double()
        var, r = (1 - t) ** 2 * s2 + t ** 2, x - (1 - t) * mu
        return (t / var * r - (mu + (1 - t) * s2 / var * r)).float()

    def edm_net(x_in, c):
        sigma = (c.double() * 4).exp().view(-1, 1, 1, 1)
        x = x_in.double() / edm.c_in(sigma)
        return ((mu + s2 / (s2 + sigma ** 2) * (x - mu) - edm.c_skip(sigma) * x) / edm.c_out(sigma)).float()

    def vp_net(x, t):
        a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        return (s / (a ** 2 * s2 + s ** 2) * (x.double() - a * mu)).float()

    assert math.isfinite(s2)
    return {"flow": (flow, flow_net), "edm": (edm, edm_net), "vp": (vp, vp_net)}


@pytest.mark.parametrize("name", ["flow", "edm", "vp"])
def test_the_ode_likelihood_equals_the_exact_gaussian_log_density(name):
    """log p(x) through each process's ODE (exact divergence, Heun) against the closed-form log-density
    of N(μ, s²I) at 16 dimensions: the error shrinks as steps grow and is within the stated bound at
    128 steps (measured: flow 0.0071 → 0.0004 nats, edm 0.84 → 0.070, vp 1.30 → 0.094, from 32 to
    128 steps; log p ≈ −14). Hutchinson's estimate agrees here (the Jacobian is a multiple of I)."""
    import math

    from ddpmkit.sdk.ode import log_likelihood

    mu, s2 = 0.5, 0.25
    process, net = _gaussian_networks(mu, s2)[name]
    x = mu + math.sqrt(s2) * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    exact = (-0.5 * (x.double() - mu) ** 2 / s2 - 0.5 * math.log(2 * math.pi * s2)).flatten(1).sum(1)
    coarse = (log_likelihood(process, net, x, steps=32, exact=True) - exact).abs().max().item()
    fine = (log_likelihood(process, net, x, steps=128, exact=True) - exact).abs().max().item()
    bound = {"flow": 0.002, "edm": 0.12, "vp": 0.12}[name]
    assert fine < bound and fine < coarse / 5, (coarse, fine)
    hutchinson = log_likelihood(process, net, x, steps=128, probes=2, generator=torch.Generator().manual_seed(0))
    assert (hutchinson - exact).abs().max().item() < bound


def test_the_vp_likelihood_always_starts_at_the_first_training_timestep():
    """vp's likelihood grid: training σ's, descending, from t = T − 1 to t = 0 at every step count, so
    more steps refine one integral (the sampling grid would start near t = T/steps: at 32 steps on
    T = 1000, σ_30 instead of σ_0, and the data read as carrying that much noise)."""
    from ddpmkit.sdk.ode import ode_view

    view = ode_view(_gaussian_networks(0.5, 0.25)["vp"][0])
    for steps in (8, 32, 128, 999):
        grid = view.likelihood_grid(steps)
        assert grid[0] == view.sigmas[-1] and grid[-1] == view.sigmas[0] and (grid[:-1] > grid[1:]).all()
        assert len(grid) == steps + 1
    assert view.grid(32)[-2] > 3 * view.sigmas[0]
    with pytest.raises(ddpmkit.DdpmkitError, match="more than the model's T − 1 = 999"):
        view.likelihood_grid(1000)


def test_ode_nll_scores_every_process_on_held_out_images(tmp_path):
    """`evaluate --metric ode-nll` on a flow and a vp run: finite bits/dim; the same seed, the same value."""
    for process in ("flow", "vp"):
        run = tmp_path / process
        changes = {} if process == "vp" else {"schedule.timesteps": None}  # flow reads no schedule: set none
        r = invoke("run", "--process", process, *small_run(changes, max_steps=2, samples=2), "--sampler", "heun",
                   "--steps", "2", "--out", str(run))
        assert r.exit_code == 0, r.output
        values = []
        for _ in range(2):
            r = invoke("evaluate", str(run), "--metric", "ode-nll", "-n", "2", "--set", "metric.steps=3",
                       "--no-progress", "--device", "cpu", "--json", str(tmp_path / "e.json"))
            assert r.exit_code == 0, r.output
            values.append(json.loads((tmp_path / "e.json").read_text())["results"]["ode_nll_bpd"])
        assert values[0] == values[1] and 0 < values[0] < 100, values


def test_a_continuous_process_that_reads_the_schedule_may_say_so():
    """`uses_schedule = True` on a continuous process lets `--schedule` through (a continuous VP made from the
    betas, say); without it the same request is one line (as for flow and edm above)."""
    from ddpmkit.run.presets import resolve_run_config
    from ddpmkit_plugins.processes.flow import FlowConfig, FlowProcess

    class ScheduledFlow(FlowProcess):
        uses_schedule = True

    class Plugin:
        @staticmethod
        @ddpmkit.hookimpl
        def register_processes(register):
            register("scheduled-flow", lambda config, **_: ScheduledFlow(config), FlowConfig, "reads the betas")
            register("plain-flow", lambda config, **_: FlowProcess(config), FlowConfig, "reads none")

    ddpmkit.register_plugin(Plugin(), name="scheduled")
    config = resolve_run_config("tiny", {"process": "scheduled-flow", "schedule": "cosine"})
    assert (config.process.name, config.schedule.name) == ("scheduled-flow", "cosine")
    with pytest.raises(ddpmkit.DdpmkitError, match="process 'plain-flow' has its own time distribution"):
        resolve_run_config("tiny", {"process": "plain-flow", "schedule": "cosine"})
