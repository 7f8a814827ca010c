"""The DDPM math agrees with diffusers' DDPMScheduler on the same betas, outputs and noise."""

import pytest
import torch
from diffusers import DDPMScheduler

import ddpmkit
from ddpmkit import GaussianDiffusion

CASES = [(T, v, c) for T in (300, 500, 1000) for v in ("fixed_small", "fixed_large") for c in (False, True)]


def _pair(T, variance, clip, prediction_type="epsilon", float64=False):
    """Our process and diffusers' scheduler on the same betas.

    diffusers keeps its tables in float32, where 1 − ᾱ_t near t = 1 loses ~3 digits to
    cancellation (1 − 0.9999 in float32); with ``float64=True`` its tables are upgraded so that
    the comparison is of the formulas alone.
    """
    betas = ddpmkit.build("schedule", "linear", {"timesteps": T})
    ours = GaussianDiffusion(betas, variance_type=variance, clip_sample=clip)
    theirs = DDPMScheduler(num_train_timesteps=T, trained_betas=betas.numpy(), variance_type=variance,
                           clip_sample=clip, prediction_type=prediction_type)
    if float64:
        theirs.betas = betas.clone()
        theirs.alphas = 1.0 - theirs.betas
        theirs.alphas_cumprod = torch.cumprod(theirs.alphas, dim=0)
        theirs.one = torch.tensor(1.0, dtype=torch.float64)
    theirs.set_timesteps(T)
    return ours, theirs


def test_linear_betas_match_diffusers_linear():
    for T in (300, 500, 1000):
        ours = ddpmkit.build("schedule", "linear", {"timesteps": T})
        theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear").betas
        assert ours.dtype == torch.float64 and ours.shape == (T,)
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("T", [300, 500, 1000])
def test_forward_noising_matches_add_noise(T):
    ours, theirs = _pair(T, "fixed_small", False)
    g = torch.Generator().manual_seed(T)
    x0 = torch.rand(T, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.arange(T)  # every timestep once
    torch.testing.assert_close(ours.q_sample(x0, t, noise), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [300, 500, 1000])
def test_posterior_mean_and_variance(T):
    ours, theirs = _pair(T, "fixed_small", False, prediction_type="sample", float64=True)
    g = torch.Generator().manual_seed(1)
    for t in (T - 1, T // 2, 1, 0):
        x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        xt = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        # with prediction_type="sample" the step is the posterior mean plus σ z; take z from a known seed
        out = theirs.step(x0, t, xt, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if t > 0 else torch.zeros_like(xt)
        var_theirs = theirs._get_variance(t)
        mean_theirs = out - var_theirs.sqrt() * z if t > 0 else out
        mean, var = ours.q_posterior(x0, xt, torch.full((2,), t))
        torch.testing.assert_close(mean, mean_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.flatten()[0].double(), var_theirs.double().clamp(min=0), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("T,variance,clip", CASES)
def test_every_reverse_step_matches_diffusers(T, variance, clip):
    ours, theirs = _pair(T, variance, clip, float64=True)
    g = torch.Generator().manual_seed(T + clip)
    worst, f64 = 0.0, dict(dtype=torch.float64)
    clipped = 0
    for t in theirs.timesteps.tolist():
        xt = torch.randn(2, 1, 4, 4, generator=g, **f64)
        eps = torch.randn(2, 1, 4, 4, generator=g, **f64)
        expected = theirs.step(eps, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t), **f64)
        got = ours.p_step(eps, xt, t, z)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step t={t}")
        worst = max(worst, (got - expected).abs().max().item())
        clipped += int(ours.predict_x0(xt, torch.full((2,), t), eps).abs().gt(1).any())
    assert worst < 1e-9
    assert clipped > T // 2  # clipping really happens on these inputs, so clip on/off is tested


def test_float32_steps_are_closer_to_exact_than_diffusers_float32():
    """Our float64 tables keep float32 sampling accurate where 1 − ᾱ_t cancels (t near 1)."""
    T = 1000
    ours, theirs32 = _pair(T, "fixed_small", False)
    _, theirs64 = _pair(T, "fixed_small", False, float64=True)
    g = torch.Generator().manual_seed(0)
    err_ours = err_theirs = 0.0
    for t in range(1, 20):  # the reverse means μ_θ near t = 1, where float32 tables cancel
        xt, eps = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
        z64 = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        out64 = theirs64.step(eps.double(), t, xt.double(), generator=torch.Generator().manual_seed(t)).prev_sample
        exact_mean = out64 - theirs64._get_variance(t).sqrt() * z64
        z32 = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t))
        out32 = theirs32.step(eps, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        mean32 = out32 - theirs32._get_variance(t).sqrt() * z32
        ours_mean = ours.p_mean(eps, xt, torch.full((4,), t))
        err_ours = max(err_ours, (ours_mean.double() - exact_mean).abs().max().item())
        err_theirs = max(err_theirs, (mean32.double() - exact_mean).abs().max().item())
    assert err_ours < 1e-5 < err_theirs


@pytest.mark.parametrize("variance,clip", [("fixed_small", True), ("fixed_large", False)])
def test_full_sampling_loop_matches_diffusers(variance, clip):
    T = 300
    ours, theirs = _pair(T, variance, clip)
    w = torch.randn(1, generator=torch.Generator().manual_seed(3))

    def model(x, t):  # a deterministic stand-in for ε_θ that depends on x and t
        return torch.tanh(x * w + t.float().reshape(-1, 1, 1, 1) / T)

    ours, theirs = _pair(T, variance, clip, float64=True)
    got = ours.sample(model, (3, 1, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((3, 1, 4, 4), generator=g, dtype=torch.float64)
    for t in theirs.timesteps.tolist():
        x = theirs.step(model(x, torch.full((3,), t)), t, x, generator=g).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance,clip", [("fixed_small", False), ("fixed_large", False), ("fixed_small", True)])
def test_sampling_loop_steps_in_place_with_p_steps_numbers(variance, clip):
    """sample() does lines 4–5 in place with the coefficients as numbers (no per-step tensors);
    its samples are those of a loop of p_step calls, bit for bit, and its model inputs are too."""
    T = 100
    d = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": T}), variance_type=variance,
                          clip_sample=clip)
    w = torch.randn(1, generator=torch.Generator().manual_seed(3)) * 3
    seen, clipped = [], []

    def model(x, t):
        seen.append(x.sum().item())
        out = torch.tanh(x * w + t.float().reshape(-1, 1, 1, 1) / T)
        clipped.append(bool(d.predict_x0(x, t, out).abs().gt(1).any()))
        return out

    def p_step_loop(net):
        g = torch.Generator().manual_seed(2)
        x = torch.randn((4, 1, 8, 8), generator=g)
        for t in reversed(range(T)):
            z = torch.randn(x.shape, generator=g) if t > 0 else None
            x = d.p_step(net(x, torch.full((4,), t)), x, t, z)
        return x

    got = d.sample(model, (4, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    seen_in_loop, seen[:] = list(seen), []
    assert torch.equal(got, p_step_loop(model)) and seen == seen_in_loop
    assert sum(clipped) > T // 2  # x̂_0 leaves [-1, 1] at most steps, so clipping (when on) is exercised
    # A network answering in another dtype (bf16 here) is stepped by p_step, in fp32, as before.
    low = d.sample(lambda x, t: model(x, t).bfloat16(), (4, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    assert low.dtype == torch.float32 and torch.equal(low, p_step_loop(lambda x, t: model(x, t).bfloat16()))


def test_eq9_equals_posterior_form_without_clipping():
    ours = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 300}))
    g = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, 300, (8,), generator=g)
    eq9 = ours.p_mean(eps, xt, t)
    via_x0 = ours.q_posterior(ours.predict_x0(xt, t, eps), xt, t)[0]
    torch.testing.assert_close(eq9, via_x0, rtol=1e-5, atol=1e-5)


def test_training_loss_uses_alpha_bar_and_uniform_t():
    """Algorithm 1 with an oracle that recovers ε exactly from x_t (known x_0) gives zero loss."""
    T = 50
    d = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": T}))
    x0 = torch.randn(4, 1, 4, 4)
    seen = []

    def oracle(xt, t):
        seen.append(t.clone())
        return (xt - d.sqrt_alphas_cumprod[t].float().view(-1, 1, 1, 1) * x0) / d.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1)

    loss = d.training_loss(oracle, x0, torch.nn.functional.mse_loss, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    ts = torch.cat([seen[0]] + [d.training_loss(oracle, x0, torch.nn.functional.mse_loss) * 0 + seen[-1] for _ in range(200)])
    assert ts.min() >= 0 and ts.max() <= T - 1 and len(ts.unique()) > T // 2


def test_tables_are_float64_and_bad_betas_rejected():
    d = GaussianDiffusion(torch.linspace(1e-4, 0.02, 10))
    assert d.alphas_cumprod.dtype == torch.float64
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    for bad in (torch.tensor([0.0, 0.1]), torch.tensor([0.5, 1.0]), torch.tensor([])):
        with pytest.raises(ValueError):
            GaussianDiffusion(bad)
