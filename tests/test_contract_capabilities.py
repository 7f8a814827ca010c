"""Each capability of the widened plugin contract, used by a test plugin through the public hooks:
conditioning, outputs beyond one tensor (a learned variance), losses with context, metrics with the
model and the data, timestep sampling as a component, loggers."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import NO_UNET, TINY_UNET, small_run

import ddpmkit
import ddpmkit.testing
from ddpmkit.cli import cli

RUN = small_run(NO_UNET, max_steps=None, seed=3)
UNET = TINY_UNET


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


# -- conditioning ------------------------------------------------------------------------------
class CondNet(torch.nn.Module):
    conditions = ("class_labels",)
    seen: list = []

    def __init__(self, channels, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.embed = torch.nn.Embedding(num_classes, channels)

    def forward(self, x, t, class_labels=None):
        CondNet.seen.append(class_labels.clone())
        return self.conv(x) + self.embed(class_labels)[:, :, None, None]


class CondPlugin:
    @staticmethod
    @ddpmkit.hookimpl
    def register_predictors(register):
        register("cond-net", lambda *, channels, resolution, num_classes: CondNet(channels, num_classes))


def test_class_labels_reach_the_predictor_in_training_and_sampling(tmp_path):
    ddpmkit.register_plugin(CondPlugin(), name="cond")
    CondNet.seen.clear()
    run = tmp_path / "run"
    r = invoke("run", *RUN, "--predictor", "cond-net", "--class-conditional", "--max-steps", "2", "--out", str(run))
    assert r.exit_code == 0, r.output
    # the first training step's labels are those of the first batch of the seeded permutation
    ds = ddpmkit.build("dataset", "mnist-5k", {"limit": 64, "resolution": 16})
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3 * 1_000_003))
    first_batch = torch.tensor([ds[int(i)][1] for i in perm[:16]])
    train_calls = [y for y in CondNet.seen if y.shape == (16,)]
    assert torch.equal(train_calls[1], first_batch)  # [0] is the probe's call on two images
    # sampling: every class in equal blocks (4 images of 10 classes), then one class for every image
    assert torch.equal(CondNet.seen[-1], torch.tensor([0, 2, 5, 7]))
    pipe = ddpmkit.load_checkpoint(run)
    assert pipe.num_classes == 10
    CondNet.seen.clear()
    pipe.sample(3, class_labels=7)
    assert all(torch.equal(y, torch.tensor([7, 7, 7])) for y in CondNet.seen)
    with pytest.raises(ddpmkit.DdpmkitError, match="unknown class 10: give an index in 0..9 or a name; classes: 0, 1,"):
        pipe.sample(2, class_labels=10)


def test_conditioning_needs_a_predictor_and_a_dataset_that_can(tmp_path):
    class PlainNet(torch.nn.Module):  # today's contract: forward(x_t, t) only
        def __init__(self, channels):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 1)

        def forward(self, x, t):
            return self.conv(x)

    class Plain:  # and a factory that names no num_classes
        @staticmethod
        @ddpmkit.hookimpl
        def register_predictors(register):
            register("plain-net", lambda *, channels, resolution: PlainNet(channels))

    ddpmkit.register_plugin(Plain(), name="plain")
    r = invoke("run", *RUN, "--predictor", "plain-net", "--class-conditional", "--max-steps", "1",
               "--out", str(tmp_path / "a"))
    assert r.exit_code == 2 and r.stderr.strip() == (
        "Error: predictor 'plain-net' (plugin 'plain', registered in-process) takes no class labels (its module "
        "declares no conditions = ('class_labels',)); drop --class-conditional or pick another predictor")
    r = invoke("run", *RUN, "--predictor", "plain-net", "--max-steps", "1", "--out", str(tmp_path / "b"))
    assert r.exit_code == 0, r.output  # and unconditionally it trains as before


def test_unet2d_is_class_conditional_on_request(tmp_path):
    run = tmp_path / "run"
    r = invoke("run", *RUN, *UNET, "--class-conditional", "--max-steps", "2", "--out", str(run))
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["data"]["num_classes"] == 10
    r = invoke("sample", str(run), "-n", "2", "--class", "3", "--out", str(tmp_path / "g.png"), "--no-progress")
    assert r.exit_code == 0, r.output


# -- a learned variance --------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 7, 19])
def test_learned_range_step_matches_diffusers(t):
    """Algorithm 2's step with a learned variance (2C output channels) is diffusers' learned_range step."""
    from diffusers import DDPMScheduler

    betas = torch.linspace(1e-4, 0.2, 20, dtype=torch.float64)
    d = ddpmkit.GaussianDiffusion(betas, variance_type="learned_range")
    ref = DDPMScheduler(num_train_timesteps=20, trained_betas=betas.tolist(), variance_type="learned_range",
                        clip_sample=False)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = torch.cat([torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
                     torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1], dim=1)
    torch.manual_seed(0)  # diffusers draws z from the global generator: draw the same z for ours
    expected = ref.step(out, t, x).prev_sample
    torch.manual_seed(0)
    z = torch.randn(x.shape, dtype=x.dtype)
    torch.testing.assert_close(d.p_step(out, x, t, z), expected, rtol=1e-4, atol=1e-5)  # diffusers: float32 tables
    out_split = d.prediction_and_variance(out)
    assert torch.equal(out_split.prediction, out[:, :3]) and torch.equal(out_split.variance, out[:, 3:])


def test_learned_variance_trains_and_samples(tmp_path):
    run = tmp_path / "run"
    r = invoke("run", *RUN, *UNET, "--set", "predictor.learn_variance=true", "--max-steps", "2", "--out", str(run))
    assert r.exit_code == 2 and "outputs a learned variance; run it with --variance learned_range" in r.stderr
    r = invoke("run", *RUN, *UNET, "--variance", "learned_range", "--max-steps", "1", "--out", str(tmp_path / "x"))
    assert r.exit_code == 2 and "--variance learned_range needs a predictor that outputs a variance" in r.stderr
    r = invoke("run", *RUN, *UNET, "--set", "predictor.learn_variance=true", "--variance", "learned_range",
               "--max-steps", "2", "--out", str(run))
    assert r.exit_code == 0, r.output
    pipe = ddpmkit.load_checkpoint(run)
    assert pipe.model.unet.config.out_channels == 2 and pipe.diffusion.variance_type == "learned_range"
    a, b = pipe.sample(2, seed=1), pipe.sample(2, seed=1)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
    assert pipe.sample(2, seed=1, sampler="ddim", sampler_options={"steps": 5}).shape == (2, 1, 16, 16)


# -- a loss with context ---------------------------------------------------------------------------
class HybridLoss:
    """MSE on ε plus λ · KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) from the learned variance, with the
    mean's gradient stopped (improved DDPM's L_hybrid, its L_vlb term without the decoder NLL)."""

    contexts: list = []

    @staticmethod
    @ddpmkit.hookimpl
    def register_losses(register):
        def factory():
            def loss(prediction, target, reduction="mean", *, context):
                HybridLoss.contexts.append(context)
                d, c = context.diffusion, context
                mse = (prediction - target).pow(2)
                true_mean, true_var = d.q_posterior(c.x0, c.xt, c.t)
                model_mean = d.p_mean(prediction.detach(), c.xt, c.t)
                log_var = d.p_log_variance(c.output.variance, c.t, c.xt)
                kl = 0.5 * (log_var - true_var.log() + (true_var + (true_mean - model_mean) ** 2) / log_var.exp() - 1)
                per = mse + 1e-3 * kl
                return per if reduction == "none" else per.mean()
            return loss
        register("hybrid-kl", factory)


def test_a_loss_receives_the_full_output_and_the_process(tmp_path):
    ddpmkit.register_plugin(HybridLoss(), name="hybrid-kl")
    HybridLoss.contexts.clear()
    r = invoke("run", *RUN, *UNET, "--set", "predictor.learn_variance=true", "--variance", "learned_range",
               "--loss", "hybrid-kl", "--max-steps", "3", "--log-every", "1",
               "--out", str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
    ctx = HybridLoss.contexts[-1]
    assert ctx.t.shape == (16,) and ctx.output.variance.shape == ctx.output.prediction.shape == (16, 1, 16, 16)
    assert isinstance(ctx.diffusion, ddpmkit.GaussianDiffusion) and ctx.weights is None
    torch.testing.assert_close(ctx.xt, ctx.diffusion.q_sample(ctx.x0, ctx.t, ctx.noise))
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)


# -- a metric with the model and the data ------------------------------------------------------------
class NearestNeighbour:
    @staticmethod
    @ddpmkit.hookimpl
    def register_metrics(register):
        def factory(*, device):
            def metric(images, context=None):
                real = torch.stack([context.dataset[i][0] for i in range(len(context.dataset))]).flatten(1)
                dist = torch.cdist(images.flatten(1).float(), real).min(dim=1).values
                return {"nn_l2": float(dist.mean()), "timesteps": float(context.pipeline.diffusion.num_timesteps)}
            return metric
        register("nn-distance", factory, None, "mean L2 distance of each sample to its nearest training image")


def test_a_metric_receives_the_pipeline_and_the_dataset(tmp_path):
    ddpmkit.register_plugin(NearestNeighbour(), name="nn")
    run = tmp_path / "run"
    r = invoke("run", *RUN, *UNET, "--max-steps", "2", "--metric", "nn-distance", "--eval-samples", "6",
               "--out", str(run))
    assert r.exit_code == 0, r.output
    results = json.loads((run / "eval.json").read_text())["results"]
    pipe = ddpmkit.load_checkpoint(run)
    images = pipe.sample(6, seed=3)
    ds = ddpmkit.build("dataset", "mnist-5k", {"limit": 64, "resolution": 16})
    real = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    expected = torch.cdist(images.flatten(1), real).min(dim=1).values.mean().item()
    assert results["timesteps"] == 20.0 and results["nn_l2"] == pytest.approx(expected, rel=1e-5)


# -- timestep sampling as a component -------------------------------------------------------------
class Weighted:
    """Uniform t (the same draws as the built-in) with weight 2 for every sample, learning from losses."""

    updates: list = []
    loaded: list = []

    @staticmethod
    @ddpmkit.hookimpl
    def register_timestep_samplers(register):
        class Sampler:
            def __init__(self, num_timesteps):
                self.T, self.count = num_timesteps, 0

            def sample(self, batch, device, generator=None):
                t = torch.randint(0, self.T, (batch,), device=device, generator=generator)
                return t, torch.full((batch,), 2.0, device=device)

            def update(self, t, losses):
                Weighted.updates.append((t.clone(), losses.clone()))
                self.count += 1

            def state_dict(self):
                return {"count": self.count}

            def load_state_dict(self, state):
                Weighted.loaded.append(state)
                self.count = state["count"]

        register("weighted", lambda *, num_timesteps: Sampler(num_timesteps), None, "uniform t, weight 2")


def test_a_timestep_sampler_draws_weights_learns_and_resumes(tmp_path):
    ddpmkit.register_plugin(Weighted(), name="weighted")
    Weighted.updates.clear()
    common = [*RUN, *UNET, "--max-steps", "2", "--log-every", "1", "--checkpoint-every", "1"]
    assert invoke("run", *common, "--out", str(tmp_path / "u")).exit_code == 0
    r = invoke("run", *common, "--timestep-sampler", "weighted", "--out", str(tmp_path / "w"))
    assert r.exit_code == 0, r.output
    loss = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                      if "loss" in json.loads(l)]
    assert loss(tmp_path / "w")[0] == pytest.approx(2 * loss(tmp_path / "u")[0], rel=1e-5)
    assert len(Weighted.updates) == 2 and Weighted.updates[0][0].shape == Weighted.updates[0][1].shape == (16,)
    r = invoke("run", "--resume", str(tmp_path / "w"), "--max-steps", "3", "--no-progress", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert Weighted.loaded == [{"count": 2}]
    r = invoke("run", "--resume", str(tmp_path / "w"), "--timestep-sampler", "uniform", "--max-steps", "4")
    assert r.exit_code == 2 and "timestep_sampler uniform (run has weighted)" in r.stderr


def test_builtin_uniform_keeps_the_contract():
    ddpmkit.sdk.testing.check_timestep_sampler("uniform")


# -- loggers ------------------------------------------------------------------------------------------
class Memory:
    records: list = []
    events: list = []

    @staticmethod
    @ddpmkit.hookimpl
    def register_loggers(register):
        class Logger:
            def __init__(self, run_config, resume_step):
                Memory.events.append(("open", run_config["components"]["schedule"]["name"], resume_step))

            def log(self, record):
                Memory.records.append(record)

            def flush(self):
                Memory.events.append("flush")

            def close(self):
                Memory.events.append("close")

        register("memory", lambda *, run_config, resume_step: Logger(run_config, resume_step))


def test_a_logger_receives_every_record(tmp_path):
    ddpmkit.register_plugin(Memory(), name="memory")
    Memory.records.clear(), Memory.events.clear()
    run = tmp_path / "run"
    r = invoke("run", *RUN, *UNET, "--max-steps", "4", "--log-every", "2", "--checkpoint-every", "2",
               "--logger", "memory", "--out", str(run))
    assert r.exit_code == 0, r.output
    assert [rec["step"] for rec in Memory.records if "loss" in rec] == [2, 4]
    assert Memory.events == [("open", "linear", None), "flush", "flush", "close"]
    assert not (run / "metrics.jsonl").exists()  # only the loggers asked for
    ddpmkit.sdk.testing.check_logger("jsonl", run_dir=tmp_path / "j")
    assert (tmp_path / "j" / "metrics.jsonl").read_text().count("\n") == 3
